"""The registry commands (`kdflow models`, `promote`, `rollback`, `show`) on a real MLflow SQLite store: the
library (`kdflow.catalog`) and the typer commands, with exact expectations on the alias and its history."""

from __future__ import annotations

import io
import json

import pytest
from typer.testing import CliRunner

from kdflow import catalog, cli, registry, tracking
from kdflow.config import RegistryConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (its tables take seconds to create); each test uses its own model name.
    MLflow's process-wide URIs and the MLFLOW_* variables are put back afterwards."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tmp = tmp_path_factory.mktemp("catalog")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.delenv("MLFLOW_REGISTRY_URI")
        mp.setenv("KDFLOW_USER", "tester")  # who moves the alias
        mp.setattr(tracking_utils, "_tracking_uri", None)
        mp.setattr(registry_utils, "_registry_uri", None)
        exp = tracking.ensure_experiment("kdflow-catalog-tests", uri)
        yield mlflow.MlflowClient(), exp, uri


def version(client, exp: str, model: str, test_top1: float, test_hash: str = "h1") -> int:
    """A registered version (no model files: these commands read tags only) scored `test_top1` on `test_hash`."""
    run = client.create_run(exp)
    tags = {"test_top1": repr(test_top1), "val_top1": repr(test_top1 - 0.01), "params": "1182.0",
            registry.TEST_HASH_TAG: test_hash, "kdflow.candidate": f"cand{test_top1}"}  # fmt: skip
    try:
        client.get_registered_model(model)
    except Exception:
        client.create_registered_model(model)
    mv = client.create_model_version(model, f"{run.info.artifact_uri}/model", run.info.run_id, tags=tags)
    return int(mv.version)


def cfg(model: str, **kw) -> RegistryConfig:
    return RegistryConfig(model_name=model, teacher_model_name=f"{model}-teacher", **kw)


def holder(client, model: str) -> int:
    return int(client.get_model_version_by_alias(model, "champion").version)


def history(client, model: str) -> list[dict]:
    return registry.alias_history(client, cfg(model))


def test_promote_through_the_gate_moves_the_alias_and_records_who_why_and_the_previous(store):
    client, exp, _ = store
    v1, v2 = version(client, exp, "gate", 0.80), version(client, exp, "gate", 0.85)
    first = catalog.promote(client, cfg("gate"), v1, "first by hand")
    assert (first.previous, first.version, first.reason) == (None, 1, "first by hand")  # no champion: no gate
    move = catalog.promote(client, cfg("gate"), v2, "better on test")
    assert holder(client, "gate") == 2
    assert (move.previous, move.version) == (1, 2)
    assert move.reason == "better on test; v2 test_top1=0.8500 beats champion v1 (0.8000)"
    moves = history(client, "gate")
    assert [(m["previous_version"], m["version"], m["user"], m["action"]) for m in moves] == [
        (None, 1, "tester", "promote"),
        (1, 2, "tester", "promote"),
    ]
    assert moves[1]["reason"] == move.reason and moves[1]["run_id"] == ""


def test_a_promote_the_gate_refuses_moves_nothing(store):
    client, exp, _ = store
    v1, v2 = version(client, exp, "refused", 0.80), version(client, exp, "refused", 0.80)
    catalog.promote(client, cfg("refused"), v1)
    with pytest.raises(catalog.CatalogError) as err:  # equal is not better
        catalog.promote(client, cfg("refused"), v2, "try")
    assert str(err.value) == (
        "refused: v2 test_top1=0.8000 does not beat champion v1 (0.8000 + 0.0); pass --force to promote anyway"
    )
    v3 = version(client, exp, "refused", 0.84)
    with pytest.raises(catalog.CatalogError, match=r"does not beat champion v1 \(0.8000 \+ 0.05\)"):
        catalog.promote(client, cfg("refused", min_improvement=0.05), v3)  # better, not by the margin
    v4 = version(client, exp, "refused", 0.99, test_hash="other")
    with pytest.raises(catalog.CatalogError, match="scored on different test data"):
        catalog.promote(client, cfg("refused"), v4)
    with pytest.raises(catalog.CatalogError, match="significance pairs both models' per-image"):
        catalog.promote(client, cfg("refused", gate="significance"), v3)
    assert holder(client, "refused") == 1 and len(history(client, "refused")) == 1


def test_a_forced_promote_skips_the_gate_and_says_so(store):
    client, exp, _ = store
    v1, worse = version(client, exp, "forced", 0.90), version(client, exp, "forced", 0.50)
    catalog.promote(client, cfg("forced"), v1)
    move = catalog.promote(client, cfg("forced"), worse, "smaller is what we ship", force=True)
    assert holder(client, "forced") == worse == 2
    assert move.reason == "forced: smaller is what we ship"
    last = history(client, "forced")[-1]
    assert (last["previous_version"], last["version"], last["reason"]) == (1, 2, "forced: smaller is what we ship")


def test_rollback_after_two_moves_walks_back_the_recorded_champions(store):
    client, exp, _ = store
    vs = [version(client, exp, "back", s) for s in (0.80, 0.85, 0.90)]
    for v in vs:
        catalog.promote(client, cfg("back"), v)
    assert holder(client, "back") == 3
    one = catalog.rollback(client, cfg("back"), "v3 misbehaves in serving")
    assert (one.previous, one.version, one.reason) == (3, 2, "rollback from v3: v3 misbehaves in serving")
    assert holder(client, "back") == 2
    two = catalog.rollback(client, cfg("back"))
    assert (two.previous, two.version) == (2, 1) and holder(client, "back") == 1  # not back to v3
    with pytest.raises(catalog.CatalogError, match="^back v1 is the first recorded champion: no previous one$"):
        catalog.rollback(client, cfg("back"))
    assert holder(client, "back") == 1
    moves = history(client, "back")
    assert [(m["previous_version"], m["version"], m.get("action")) for m in moves] == [
        (None, 1, "promote"), (1, 2, "promote"), (2, 3, "promote"), (3, 2, "rollback"), (2, 1, "rollback"),
    ]  # fmt: skip


def test_the_champion_line_replays_moves_rollbacks_and_undos():
    undone = {"reason": "undone: the register step failed"}
    moves = [(1, {}), (2, {}), (3, {}), (2, undone), (4, {}), (2, {"action": "rollback"})]
    m = [{"version": v, **kw} for v, kw in moves]
    assert catalog.champion_line(m) == [1, 2]
    assert catalog.champion_line([*m, {"version": None, "reason": "undone: …"}]) == []
    assert catalog.champion_line([]) == []


def test_bad_input_is_one_error_and_moves_nothing(store):
    client, exp, _ = store
    v1 = version(client, exp, "bad", 0.8)
    catalog.promote(client, cfg("bad"), v1)
    with pytest.raises(catalog.CatalogError, match="^no registered model 'nope'$"):
        catalog.promote(client, cfg("nope"), 1)
    with pytest.raises(catalog.CatalogError, match="^model 'bad' has no version 7$"):
        catalog.promote(client, cfg("bad"), 7)
    with pytest.raises(catalog.CatalogError, match="^bad v1 already holds 'champion'$"):
        catalog.promote(client, cfg("bad"), 1)
    with pytest.raises(catalog.CatalogError, match="^no registered model 'nope'$"):
        catalog.rollback(client, cfg("nope"))
    assert holder(client, "bad") == 1 and len(history(client, "bad")) == 1


# ---------------------------------------------------------------------------------------------- commands


def invoke(uri: str, *args: str):
    return CliRunner().invoke(cli.app, [*args, "--tracking-uri", uri], catch_exceptions=False)


def test_the_commands_promote_roll_back_and_list(store):
    client, exp, uri = store
    v1, v2 = version(client, exp, "cmd", 0.80), version(client, exp, "cmd", 0.90)
    out = invoke(uri, "promote", "cmd", str(v1), "--reason", "first")
    assert out.exit_code == 0 and out.stdout == "cmd: champion v1 (was none): first\n"
    out = invoke(uri, "promote", "cmd", str(v2))
    assert out.stdout == "cmd: champion v2 (was v1): promoted by hand; v2 test_top1=0.9000 beats champion v1 (0.8000)\n"
    out = invoke(uri, "rollback", "cmd")
    assert out.exit_code == 0 and out.stdout == "cmd: champion back to v1 (was v2)\n"
    out = invoke(uri, "promote", "cmd", "9")
    assert (out.exit_code, out.stdout) == (1, "error: model 'cmd' has no version 9\n")
    out = invoke(uri, "promote", "nope", "1")
    assert (out.exit_code, out.stdout) == (1, "error: no registered model 'nope'\n")
    assert holder(client, "cmd") == 1
    rows = {r.name: r for r in catalog.list_models(client)}
    assert (rows["cmd"].champion, rows["cmd"].versions) == (1, 2)
    assert rows["cmd"].headline == {"val_top1": 0.79, "test_top1": 0.80, "params": 1182.0}
    assert rows["cmd"].last_move.endswith(" by tester")
    listing = invoke(uri, "models").stdout.splitlines()
    (line,) = [ln for ln in listing if ln.startswith("│ cmd ")]
    assert [c.strip() for c in line.strip("│").split("│")][:7] == ["cmd", "v1", "2", "79.00%", "80.00%", "1,182", ""]
    versions = invoke(uri, "models", "cmd").stdout
    rows = [[c.strip() for c in ln.strip("│").split("│")] for ln in versions.splitlines() if ln.startswith("│")]
    cells = [r[:5] for r in rows]
    assert cells == [["v1", "cand0.8", "champion", "79.00%", "80.00%"], ["v2", "cand0.9", "", "89.00%", "90.00%"]]


def test_the_commands_refuse_a_missing_store(tmp_path):
    out = CliRunner().invoke(cli.app, ["models", "--home", str(tmp_path / "none")], env={"MLFLOW_TRACKING_URI": ""})
    assert out.exit_code == 2
    db = tmp_path / "none" / "mlflow.db"
    assert out.stdout == f"error: no MLflow store at {db}: run kdflow run first, or pass --home/--tracking-uri\n"
    assert not (tmp_path / "none").exists()  # nothing created


SUMMARY = {
    "decision": {"selected": "cnn4-kd", "promoted": True, "reason": "cnn4-kd is the first champion (test_top1=0.9174)",
                 "versions": {"cnn4-kd": 2, "cnn4-ce": 1}, "champion_version": 2, "previous_champion": None,
                 "previous_score": None, "rejected": {}, "teacher_version": 1,
                 "selection_reason": "cnn4-kd leads cnn4-ce on val_top1: 93.75% vs 83.33% (10.42%)"},
    "evidence": {"gains_vs_ce": {"cnn4-kd": {"baseline": "cnn4-ce", "diff": 0.074, "ci_low": 0.03, "ci_high": 0.122,
                                             "p_value": 0.001, "shown": "+7.4 [+3.0, +12.2]"}},
                 "gains_vs_scratch": {}, "weak_teacher": False, "weak_teacher_reason": ""},
    "teacher": {"version": 1, "val_top1": 0.9688, "test_top1": 0.9261, "params": 65834, "macs": 1490000,
                "latency_ms_b1": 0.778},
    "candidates": {
        "cnn4-kd": {"version": 2, "val_top1": 0.9375, "test_top1": 0.9174, "params": 1182, "macs": 25000,
                    "latency_ms_b1": 0.545, "teacher_agreement": 0.9217},
        "cnn4-ce": {"version": 1, "val_top1": 0.8333, "test_top1": 0.8435, "params": 1182, "macs": 25000,
                    "latency_ms_b1": 0.459, "teacher_agreement": 0.8304},
    },
    "model_name": "kdflow-digits-student",
    "policy": {},
}  # fmt: skip


def printed(summary: dict) -> str:
    """What `kdflow run` prints as its final table and decision (`cli._print_summary`)."""
    from rich.console import Console

    buf = io.StringIO()
    old, cli.console = cli.console, Console(file=buf, width=120)
    try:
        cli._print_summary(summary)
    finally:
        cli.console = old
    return buf.getvalue()


def pipeline_parent(client, exp: str, name: str, summary: dict | None) -> str:
    run = client.create_run(exp, run_name=name, tags={tracking.STEP_TAG: tracking.PIPELINE_STEP})
    if summary is not None:
        client.log_dict(run.info.run_id, summary, tracking.SUMMARY_ARTIFACT)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_show_reproduces_the_runs_table_and_decision(store):
    client, exp, uri = store
    older = pipeline_parent(client, exp, "older-run", {**SUMMARY, "model_name": "older"})
    latest = pipeline_parent(client, exp, "latest-run", SUMMARY)
    table = printed(SUMMARY)
    assert "│ cnn4-kd │ 93.75% │ 91.74% │ +7.4 [+3.0, +12.2]* │" in table
    for args in ([], [latest], ["latest-run"]):  # the last pipeline run, by id, by name
        out = invoke(uri, "show", *args)
        assert out.exit_code == 0, out.stdout
        head, rest = out.stdout.split("\n", 1)
        assert head.startswith(f"pipeline run latest-run ({latest}), FINISHED, started ")
        assert rest == table
    assert invoke(uri, "show", older).stdout.split("\n", 1)[1] == printed({**SUMMARY, "model_name": "older"})
    assert "selected: cnn4-kd leads cnn4-ce" in table and "promoted: cnn4-kd is the first champion" in table


def test_show_names_a_bad_run(store):
    client, exp, uri = store
    out = invoke(uri, "show", "no-such-run")
    assert (out.exit_code, out.stdout) == (
        1, "error: no pipeline run 'no-such-run' (neither a run id nor a pipeline run name)\n"
    )  # fmt: skip
    failed = pipeline_parent(client, exp, "died-early", None)
    out = invoke(uri, "show", failed)
    assert out.exit_code == 1
    assert (
        out.stdout
        == f"error: pipeline run died-early ({failed}, FINISHED) has no summary: it did not reach its register step\n"
    )
    step = client.create_run(exp, tags={tracking.STEP_TAG: "teacher"}).info.run_id
    out = invoke(uri, "show", step)
    assert (out.exit_code, out.stdout) == (1, f"error: run {step} is a 'teacher' step, not a pipeline run\n")


def test_show_reads_an_older_runs_decision_from_its_register_run(store):
    client, exp, uri = store
    parent = pipeline_parent(client, exp, "before-summary-copies", None)
    reg = client.create_run(exp, tags={"mlflow.parentRunId": parent, tracking.STEP_TAG: "register"})
    client.log_dict(reg.info.run_id, SUMMARY, "decision.json")
    out = invoke(uri, "show", parent)
    assert out.exit_code == 0 and out.stdout.split("\n", 1)[1] == printed(SUMMARY)
    assert json.loads(json.dumps(SUMMARY)) == SUMMARY  # (what was logged is what was printed from)
