"""The pipeline's steps run in-process against a real SQLite MLflow store: distill, evaluate, register and
finalize on one tiny run (data, teacher and pruning built once for the module), with exact expectations on
their files, their MLflow runs and the registry."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdflow import data, deploy, evaluate, registry, stats, tracking
from kdflow.config import Config, load_config
from kdflow.errors import ConfigError
from kdflow.models import checkpoint, count_params
from kdflow.steps import distill as distill_step
from kdflow.steps import register as register_step
from kdflow.steps.context import GROUP_FILE, INFO_FILE, StepContext, pruned_dir, read_info, seed_dir
from kdflow.steps.data_prep import prepare_data, record_data
from kdflow.steps.distill import distill
from kdflow.steps.evaluate import evaluate_candidates
from kdflow.steps.finalize import finalize
from kdflow.steps.prune import prune_teacher
from kdflow.steps.register import register
from kdflow.steps.teacher import train_teacher
from tests.helpers.config import tiny_overrides as _tiny_overrides


def tiny_overrides(**extra) -> dict:
    """The tiny config, with the ONNX export on: these tests cover it (and the INT8 candidates built on it)."""
    return _tiny_overrides(**{"export.onnx": True, **extra})


HEADLINE = registry.HEADLINE_METRICS
NAMES = ["pruned60-kd", "pruned60-ce"]  # the tiny config's grid, students first
EPOCHS = 2  # tiny_overrides' distill epochs
PIPELINE_RUN = "steps-test-run"


@dataclass
class Pipeline:
    """What the module's tiny run built once: the store, the prepared data, the teacher and the pruned net."""

    tmp: Path
    uri: str
    cfg: Config
    ctx: StepContext
    manifest: dict
    data_dir: str
    teacher_dir: str
    pruned_dir: str

    @property
    def inputs(self) -> tuple[str, str, str]:
        """What a distill step reads: the data, the teacher and the pruned networks."""
        return self.data_dir, self.teacher_dir, self.pruned_dir

    def client(self):
        return tracking.client()

    def context(self, pipeline_run_id: str, **overrides) -> StepContext:
        """Another pipeline run (its own parent run) in the same store, optionally with another config."""
        cfg = load_config(None, tiny_overrides(**overrides))
        return StepContext.open(
            config_json=cfg.to_json(),
            tracking_uri=self.uri,
            pipeline_run_id=pipeline_run_id,
            pipeline_run_name=pipeline_run_id,
        )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Data prep, teacher and prune of the tiny config, once for the module, into a fresh SQLite store. MLflow's
    process-wide URIs, the MLFLOW_* variables `mlflow.set_tracking_uri` exports and torch's thread count
    (the steps set it) are put back afterwards."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tmp = tmp_path_factory.mktemp("steps")
    uri = f"sqlite:///{tmp}/mlflow.db"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # recorded, so undone on exit
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.delenv("MLFLOW_REGISTRY_URI")  # the registry follows the tracking store
        mp.delenv("KDFLOW_PARALLEL_THREADS", raising=False)
        mp.setattr(tracking_utils, "_tracking_uri", None)
        mp.setattr(registry_utils, "_registry_uri", None)
        cfg = load_config(None, tiny_overrides())
        data_dir, teacher_dir, pruned_root = (str(tmp / d) for d in ("data", "teacher", "pruned"))
        manifest = prepare_data(cfg, data_dir)
        ctx = StepContext.open(
            config_json=cfg.to_json(), tracking_uri=uri, pipeline_run_id=PIPELINE_RUN, pipeline_run_name="steps test"
        )
        train_teacher(ctx, data_dir, teacher_dir)
        prune_teacher(ctx, data_dir, teacher_dir, pruned_root)
        try:
            yield Pipeline(tmp, uri, cfg, ctx, manifest, data_dir, teacher_dir, pruned_root)
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def distilled(pipeline):
    """The distill step on both candidates of the grid: (its return value, its output folder)."""
    out = pipeline.tmp / "students"
    result = distill(pipeline.ctx, NAMES, pipeline.data_dir, pipeline.teacher_dir, pipeline.pruned_dir, str(out))
    return result, out


@pytest.fixture(scope="module")
def evaluated(pipeline, distilled):
    """The evaluate step on the distill step's output: (reports as returned, the report file)."""
    _, student_dir = distilled
    path = pipeline.tmp / "reports" / "report.json"
    reports = evaluate_candidates(pipeline.ctx, pipeline.data_dir, pipeline.teacher_dir, str(student_dir), str(path))
    return reports, path


def runs_under(client, ctx: StepContext) -> dict[str, object]:
    """The child runs of `ctx`'s parent run, by name (names are unique within one pipeline run here)."""
    found = client.search_runs([ctx.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{ctx.parent_id}'")
    by_name = {r.info.run_name: r for r in found}
    assert len(by_name) == len(found)
    return by_name


def all_runs(client, ctx: StepContext) -> list:
    return client.search_runs([ctx.experiment_id], max_results=10_000)


# ------------------------------------------------------------------------------------------- context


def test_context_finds_the_same_parent_run_again(pipeline):
    client = pipeline.client()
    again = pipeline.context(PIPELINE_RUN)
    assert again.parent_id == pipeline.ctx.parent_id
    assert again.experiment_id == pipeline.ctx.experiment_id
    assert again.tracking_uri == pipeline.uri and again.pipeline_run_id == PIPELINE_RUN
    parent = client.get_run(pipeline.ctx.parent_id)
    assert parent.info.run_name == "steps test"
    assert parent.data.tags[tracking.PIPELINE_RUN_TAG] == PIPELINE_RUN
    assert parent.data.tags[tracking.STEP_TAG] == tracking.PIPELINE_STEP
    assert parent.data.params == {k: v[:6000] for k, v in pipeline.cfg.flat().items()}
    assert client.get_experiment(pipeline.ctx.experiment_id).name == pipeline.cfg.experiment


def test_a_failing_child_marks_itself_and_the_parent_failed(pipeline):
    client = pipeline.client()
    ctx = pipeline.context("steps-child-fails")
    with pytest.raises(RuntimeError, match="inside the step"), ctx.child("broken", "teacher", {"x": "1"}):
        raise RuntimeError("inside the step")
    (child,) = runs_under(client, ctx).values()
    assert (child.info.run_name, child.info.status) == ("broken", "FAILED")
    assert child.data.tags[tracking.STEP_TAG] == "teacher" and child.data.tags["x"] == "1"
    assert client.get_run(ctx.parent_id).info.status == "FAILED"


def test_record_data_logs_the_manifest_as_the_data_prep_child_run(pipeline):
    client = pipeline.client()
    ctx = pipeline.context("steps-record-data")
    record_data(ctx, pipeline.data_dir)
    (run,) = runs_under(client, ctx).values()
    assert (run.info.run_name, run.info.status) == ("data-prep", "FINISHED")
    assert run.data.tags[tracking.STEP_TAG] == "data"
    assert run.data.tags["kdflow.data_hash"] == pipeline.manifest["content_hash"]
    assert run.data.params == {f"data.{k}": str(v) for k, v in pipeline.cfg.data.model_dump().items()}
    tasks = pipeline.manifest["tasks"]
    assert run.data.metrics == {f"{t}_{s}_count": n for t in data.TASKS for s, n in tasks[t]["counts"].items()}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"manifest.json", "config.json"}


def test_prune_logs_one_name_per_quantity_with_the_ratio_as_the_step(pipeline):
    client = pipeline.client()
    run = runs_under(client, pipeline.ctx)["prune"]
    report = json.loads((Path(pipeline.pruned_dir) / "report.json").read_text())
    (row,) = report  # the tiny config prunes at 0.6 only
    names = {"params_before", "params_after", "macs_before", "macs_after", "param_reduction", "mac_reduction",
             "val_top1_before_finetune"}  # fmt: skip
    assert set(run.data.metrics) == {f"ratio/{k}" for k in names}  # no ratio_0.6_... keys
    for k in names:
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"ratio/{k}")] == [
            (60, float(row[k]))
        ], k


# ------------------------------------------------------------------------------------------- distill


def expected_lineage(pipeline: Pipeline, name: str) -> dict[str, str]:
    loss = name.split("-")[1]
    return {
        "kdflow.candidate": name,
        "kdflow.student": "pruned60",
        "kdflow.student_arch": pipeline.cfg.teacher.arch,
        "kdflow.prune_ratio": "0.6",
        "kdflow.init": "pruned",  # the pruned teacher's weights (not a from-scratch twin)
        "kdflow.loss": loss,
        "kdflow.loss_name": loss,
        # only the settings the loss reads: kd's T, α, standardization and transfer set; ce none of them
        **(
            {
                "kdflow.temperature": "4.0",
                "kdflow.alpha": "0.9",
                "kdflow.standardize": "False",
                "kdflow.transfer": "target",
            }
            if loss == "kd"
            else {}
        ),  # fmt: skip
        "kdflow.teacher_run_id": read_info(pipeline.teacher_dir)["run_id"],
        "kdflow.data_hash": pipeline.manifest["content_hash"],
        "kdflow.trained_with": "pruned60-kd,pruned60-ce",
        tracking.PIPELINE_RUN_TAG: PIPELINE_RUN,
    }


def test_distill_returns_each_candidates_best_epoch(distilled):
    result, _ = distilled
    assert list(result) == NAMES
    for r in result.values():
        assert set(r) == {"best_val_top1", "best_epoch"}
        assert 0.0 <= r["best_val_top1"] <= 1.0
        assert type(r["best_epoch"]) is int and 0 <= r["best_epoch"] <= EPOCHS


def test_distill_writes_the_group_and_one_folder_per_candidate(pipeline, distilled):
    result, out = distilled
    assert json.loads((out / GROUP_FILE).read_text()) == NAMES
    assert sorted(p.name for p in out.iterdir()) == sorted([GROUP_FILE, *NAMES])
    teacher_run = read_info(pipeline.teacher_dir)["run_id"]
    assert teacher_run == runs_under(pipeline.client(), pipeline.ctx)["teacher"].info.run_id
    val = data.load_imageset(pipeline.data_dir, "target", "val")
    norm = data.Normalizer.from_manifest(pipeline.manifest)
    for name in NAMES:
        cdir = out / name
        files = sorted(p.name for p in cdir.iterdir())
        assert files == sorted([checkpoint.WEIGHTS_FILE, checkpoint.SPEC_FILE, INFO_FILE])
        info = read_info(cdir)
        assert set(info) == {"name", "run_id", "model_uri", "tags", "best_epoch"}
        assert info["name"] == name and info["best_epoch"] == result[name]["best_epoch"]
        assert info["model_uri"].startswith("models:/")
        assert info["tags"] == expected_lineage(pipeline, name)
        # the checkpoint holds the best-validation weights, in the pruned network's shape
        model, spec = checkpoint.load(cdir)
        pruned, pruned_spec = checkpoint.load(pruned_dir(pipeline.pruned_dir, 0.6))
        assert spec == pruned_spec
        assert count_params(model) == count_params(pruned)
        assert evaluate.accuracy(evaluate.predict(model, val.x, norm), val.y) == result[name]["best_val_top1"]


def test_distill_logs_one_finished_child_run_per_candidate(pipeline, distilled):
    result, out = distilled
    client = pipeline.client()
    children = runs_under(client, pipeline.ctx)
    assert set(children) == {"teacher", "prune", *NAMES}  # failing and other steps' tests use runs of their own
    assert client.get_run(pipeline.ctx.parent_id).info.status == "RUNNING"  # the exit handler ends it
    train = pipeline.cfg.distill.train.model_dump()
    for name in NAMES:
        run = children[name]
        assert run.info.run_id == read_info(out / name)["run_id"]
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert {k: tags[k] for k in expected_lineage(pipeline, name)} == expected_lineage(pipeline, name)
        assert tags[tracking.STEP_TAG] == "distill" and tags["mlflow.parentRunId"] == pipeline.ctx.parent_id
        cand = pipeline.cfg.candidate(name)
        used = ("temperature", "alpha", "standardize", "transfer") if name.endswith("-kd") else ()
        assert run.data.params == {
            **{f"student.{k}": str(v) for k, v in cand.student.model_dump().items()},
            "loss.name": cand.loss.name,
            "loss.kind": cand.loss.kind,
            **{f"loss.{k}": str(getattr(cand.loss, k)) for k in used},
            **{f"train.{k}": str(v) for k, v in train.items()},
        }
        assert run.data.params["loss.kind"] == name.split("-")[1]
        assert run.data.params["train.epochs"] == str(EPOCHS)
        assert run.data.metrics["best_epoch"] == result[name]["best_epoch"]
        assert "best_val_top1" not in run.data.metrics  # one name per quantity: the evaluate step's val_top1
        # one point per epoch, at steps 1..epochs, under epoch/ (evaluation's final values have names of their own)
        for key in ("epoch/val_top1", "epoch/val_loss", "epoch/train_loss", "epoch/lr"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
        assert not {"val_acc", "epoch/val_acc", "train_loss"} & set(run.data.metrics)
        assert {tracking.VERSION_TAG, "mlflow.user", "mlflow.source.git.commit"} <= set(tags)  # provenance
        val_acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch/val_top1")}
        best, best_epoch = result[name]["best_val_top1"], result[name]["best_epoch"]
        assert best >= max(val_acc.values())  # the best epoch wins on accuracy first (ties: lower val loss)
        if best_epoch > 0:
            assert val_acc[best_epoch] == best


def test_distill_rejects_an_unknown_candidate_before_any_run(pipeline, tmp_path):
    client = pipeline.client()
    before = len(all_runs(client, pipeline.ctx))
    out = tmp_path / "students"
    with pytest.raises(ConfigError) as err:
        distill(pipeline.ctx, ["pruned60-kd", "nope"], *pipeline.inputs, str(out))
    assert str(err.value) == "unknown candidate 'nope'; the config defines ['pruned60-kd', 'pruned60-ce']"
    with pytest.raises(ValueError, match="distill got no candidates"):
        distill(pipeline.ctx, [], *pipeline.inputs, str(out))
    assert len(all_runs(client, pipeline.ctx)) == before
    assert not out.exists()  # nothing written either
    assert client.get_run(pipeline.ctx.parent_id).info.status == "RUNNING"


def test_a_failure_in_training_marks_the_candidates_and_the_parent_failed(pipeline, tmp_path, monkeypatch):
    client = pipeline.client()
    ctx = pipeline.context("steps-distill-fails")

    def explode(*args, **kwargs):
        raise RuntimeError("training exploded")

    monkeypatch.setattr(distill_step, "fit_many", explode)
    out = tmp_path / "students"
    with pytest.raises(RuntimeError, match="training exploded"):
        distill(ctx, NAMES, pipeline.data_dir, pipeline.teacher_dir, pipeline.pruned_dir, str(out))
    children = runs_under(client, ctx)
    assert set(children) == set(NAMES)
    assert {n: r.info.status for n, r in children.items()} == dict.fromkeys(NAMES, "FAILED")
    assert all(r.info.end_time is not None for r in children.values())
    assert client.get_run(ctx.parent_id).info.status == "FAILED"
    assert json.loads((out / GROUP_FILE).read_text()) == NAMES
    assert not any((out / n).exists() for n in NAMES)  # no checkpoint of an untrained candidate


SEARCH = {"distill.search": {"variants": 4, "rung_epochs": 1}, "distill.train": {"epochs": 3}}


def test_a_search_candidate_trains_its_variants_by_halving_and_keeps_the_chosen_one(pipeline, tmp_path):
    """4 variants over 3 epochs, halved after epochs 1 and 2 within each data stream: each variant's curve is in
    the candidate's run (the halted ones' too: their logger is flushed when they stop), the chosen settings
    are its lineage, and its checkpoint scores the chosen variant's best validation accuracy."""
    client = pipeline.client()
    ctx = pipeline.context("steps-search", **SEARCH)
    out = tmp_path / "students"
    result = distill(ctx, ["pruned60-auto"], pipeline.data_dir, pipeline.teacher_dir, pipeline.pruned_dir, str(out))
    info = read_info(out / "pruned60-auto")
    rows = info["search"]
    assert [r["variant"] for r in rows] == ["auto00", "auto01", "auto02", "auto03"] and rows[0]["kind"] == "ce"
    (chosen,) = [r for r in rows if r["chosen"]]
    assert chosen["halted_at"] is None and chosen["epochs"] == 3
    finalists = [r for r in rows if r["halted_at"] is None]
    assert 1 <= len(finalists) <= 2  # one per data stream (target only; with source images)
    assert chosen["best_val_acc"] == max(r["best_val_acc"] for r in finalists)
    assert all(r["epochs"] == r["halted_at"] for r in rows if r["halted_at"] is not None)
    assert {r["halted_at"] for r in rows} <= {1, 2, None}
    assert result["pruned60-auto"]["best_val_top1"] == chosen["best_val_acc"]
    tags = info["tags"]
    assert tags["kdflow.search"] == "auto" and tags["kdflow.loss"] == chosen["kind"]
    assert tags["kdflow.search_choice"] == chosen["variant"]
    run = runs_under(client, ctx)["pruned60-auto"]
    assert run.info.status == "FINISHED" and run.data.tags["kdflow.loss"] == chosen["kind"]
    assert run.data.params["search.variants"] == "4" and "loss.kind" not in run.data.params
    assert run.data.params["search.chosen.kind"] == chosen["kind"]
    for r in rows:
        history = client.get_metric_history(run.info.run_id, f"search/{r['variant']}/val_top1")
        assert sorted(m.step for m in history) == list(range(1, r["epochs"] + 1)), r["variant"]
    assert "search.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    model, _ = checkpoint.load(out / "pruned60-auto")
    val = data.load_imageset(pipeline.data_dir, "target", "val")
    norm = data.Normalizer.from_manifest(pipeline.manifest)
    assert evaluate.accuracy(evaluate.predict(model, val.x, norm), val.y) == chosen["best_val_acc"]


def test_several_seeds_train_score_and_pair_every_candidate_per_seed(pipeline, distilled, tmp_path):
    """`distill.seeds: [0, 1]`: the seed-0 models are exactly the one-seed run's (the registered ones), seed 1's sit
    in `seeds/1/`; evaluation's validation metrics are the two seeds' means, its test metrics seed 0's with the
    mean and std beside them, and the gain over ce is a two-seed paired interval."""
    names = {"registry.model_name": "steps-seeds", "registry.teacher_model_name": "steps-seeds-teacher"}
    ctx = pipeline.context("steps-seeds", **{"distill.seeds": [0, 1]}, **names)
    out, report_path = tmp_path / "students", tmp_path / "report.json"
    distill(ctx, NAMES, pipeline.data_dir, pipeline.teacher_dir, pipeline.pruned_dir, str(out))
    _, one_seed = distilled
    val = data.load_imageset(pipeline.data_dir, "target", "val")
    test = data.load_imageset(pipeline.data_dir, "target", "test")
    norm = data.Normalizer.from_manifest(pipeline.manifest)
    expected = {}
    for name in NAMES:
        assert read_info(out / name)["seeds"] == [0, 1]
        first, _ = checkpoint.load(out / name)
        again, _ = checkpoint.load(one_seed / name)
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
        second, _ = checkpoint.load(seed_dir(out / name, 1))
        pair = [evaluate.predict(m, val.x, norm) for m in (first, second)]
        tests = [evaluate.predict(m, test.x, norm).argmax(1) == test.y for m in (first, second)]
        expected[name] = ([evaluate.accuracy(p, val.y) for p in pair], tests)
    reports = evaluate_candidates(ctx, pipeline.data_dir, pipeline.teacher_dir, str(out), str(report_path))
    for r in reports:
        vals, tests = expected[r["name"]]
        m = r["metrics"]
        assert m["val_top1"] == pytest.approx(np.mean(vals)) and m["seeds"] == 2
        assert m["val_top1_std"] == pytest.approx(np.std(vals, ddof=1))
        assert m["test_top1"] == pytest.approx(float(tests[0].float().mean()))
        accs = [float(t.float().mean()) for t in tests]
        assert m["test_top1_mean"] == pytest.approx(np.mean(accs)) and m["test_top1_std"] == pytest.approx(
            np.std(accs, ddof=1)
        )
        assert r["seeds"] == [0, 1] and r["test_correct_seeds"] == [t.int().tolist() for t in tests]
        assert r["test_correct"] == r["test_correct_seeds"][0]
    summary = register(
        ctx, pipeline.data_dir, pipeline.teacher_dir, [str(out)], [str(report_path)], str(tmp_path / "d")
    )
    gain = summary["evidence"]["gains_vs_ce"]["pruned60-kd"]
    kd, ce = (np.array([t.numpy() for t in expected[n][1]]) for n in NAMES)
    assert gain["seeds"] == 2 and gain["n"] == len(test)
    assert gain["diff"] == pytest.approx(kd.mean() - ce.mean())
    assert (gain["a_only"], gain["b_only"]) == (int((kd & ~ce).sum()), int((ce & ~kd).sum()))


def test_a_retry_after_a_permanent_error_fails_at_once(pipeline, tmp_path, monkeypatch):
    """A distill attempt that fails on bad input (a ValueError) records it on the parent run; a retry of the same
    step and loop iteration then refuses without training, while another iteration still runs."""
    from kdflow.runner import entrypoints

    ctx = pipeline.context("steps-permanent")
    run = {
        "config_json": ctx.cfg.to_json(),
        "tracking_uri": pipeline.uri,
        "pipeline_run_id": "steps-permanent",
        "pipeline_run_name": "steps-permanent",
    }
    paths = {"data": pipeline.data_dir, "teacher": pipeline.teacher_dir, "pruned": pipeline.pruned_dir}
    trained = []

    def fit_many(*args, **kwargs):
        trained.append(1)
        raise RuntimeError("training started")  # not a permanent error: nothing recorded

    monkeypatch.setattr(distill_step, "fit_many", fit_many)
    with pytest.raises(ConfigError, match="unknown candidate 'pruned60-nope'"):
        entrypoints.distill(candidates="pruned60-nope", student=str(tmp_path / "a"), **paths, **run)
    tags = pipeline.client().get_run(ctx.parent_id).data.tags
    (key,) = [k for k in tags if k.startswith(entrypoints.PERMANENT_TAG)]
    assert key.startswith("kdflow.permanent_error.distill.") and "unknown candidate 'pruned60-nope'" in tags[key]
    with pytest.raises(
        entrypoints.NotRetried, match="^not retried: an earlier attempt failed permanently: ConfigError"
    ):
        entrypoints.distill(candidates="pruned60-nope", student=str(tmp_path / "b"), **paths, **run)
    assert not (tmp_path / "b").exists() and trained == []
    with pytest.raises(RuntimeError, match="training started"):  # another iteration is not refused
        entrypoints.distill(candidates="pruned60-kd", student=str(tmp_path / "c"), **paths, **run)
    assert trained == [1]
    again = pipeline.client().get_run(ctx.parent_id).data.tags
    assert [k for k in again if k.startswith(entrypoints.PERMANENT_TAG)] == [key]


# ------------------------------------------------------------------------------------------ evaluate


def expected_metric_keys(manifest: dict, test_y: torch.Tensor, teacher_metrics: dict) -> set[str]:
    keys = {"test_top1", "test_loss", "test_ece", "val_top1", "val_loss", "teacher_agreement"}
    if manifest["tasks"]["target"]["num_classes"] > 5:
        keys |= {"test_top5", "val_top5"}
    keys |= {f"test_class_{int(c)}_acc" for c in test_y.unique()}
    keys |= {"params", "size_bytes", "flops", "macs", "latency_ms_b1", "latency_ms_b64", "compression", "speedup_b1"}
    keys |= {"latency_iqr_ms_b1", "latency_iqr_ms_b64"}
    # the ONNX export: parity with PyTorch, size, ONNX Runtime latency and the measured speed-up over the teacher
    keys |= {"onnx_max_abs_diff", "onnx_top1_agreement", "onnx_size_bytes", "mac_ratio", "speedup", "speedup_share"}
    keys |= {f"ort_{k}_b{b}" for k in ("latency_ms", "latency_iqr_ms", "speedup") for b in (1, 64)}
    keys.add("speedup_flagged")
    if teacher_metrics["val_top1"] > 0:
        keys.add("teacher_retention")
    return keys


def test_evaluate_reports_recomputed_metrics(pipeline, distilled, evaluated):
    _, student_dir = distilled
    reports, path = evaluated
    assert json.loads(path.read_text()) == reports
    assert [r["name"] for r in reports] == NAMES
    manifest, norm = pipeline.manifest, data.Normalizer.from_manifest(pipeline.manifest)
    num_classes = manifest["tasks"]["target"]["num_classes"]
    assert num_classes == 10  # digits: top-5 is measured
    test = data.load_imageset(pipeline.data_dir, "target", "test")
    val = data.load_imageset(pipeline.data_dir, "target", "val")
    teacher, _ = checkpoint.load(pipeline.teacher_dir)
    teacher_metrics = read_info(pipeline.teacher_dir)["metrics"]
    assert teacher_metrics["test_top1"] > 0
    teacher_pred = evaluate.predict(teacher, test.x, norm).argmax(1)
    example = norm(data.load_split(pipeline.data_dir, "target", "train")[0][:8])
    for rep in reports:
        cdir = student_dir / rep["name"]
        m = rep["metrics"]
        assert set(rep) == {"name", "metrics", "confusion_matrix", "classes", "test_correct", "onnx_model_uri"}
        assert rep["classes"] == manifest["tasks"]["target"]["classes"]
        assert set(m) == expected_metric_keys(manifest, test.y, teacher_metrics)
        model, _ = checkpoint.load(cdir)
        logits = evaluate.predict(model, test.x, norm)
        pred = logits.argmax(1)
        assert m["test_top1"] == float((pred == test.y).float().mean())
        top5 = logits.topk(5, dim=1).indices
        assert m["test_top5"] == float((top5 == test.y[:, None]).any(1).float().mean())
        assert m["test_loss"] == pytest.approx(float(F.cross_entropy(logits, test.y)), rel=1e-6)
        assert m["test_ece"] == pytest.approx(evaluate.expected_calibration_error(logits, test.y, 15), abs=1e-7)
        for c in test.y.unique().tolist():
            mask = test.y == c
            assert m[f"test_class_{c}_acc"] == int((pred[mask] == c).sum()) / int(mask.sum())
        cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for t, p in zip(test.y.tolist(), pred.tolist()):
            cm[t, p] += 1
        assert rep["confusion_matrix"] == cm.tolist()
        val_logits = evaluate.predict(model, val.x, norm)
        assert m["val_top1"] == float((val_logits.argmax(1) == val.y).float().mean())
        assert m["val_top5"] == float((val_logits.topk(5, dim=1).indices == val.y[:, None]).any(1).float().mean())
        assert m["val_loss"] == pytest.approx(float(F.cross_entropy(val_logits, val.y)), rel=1e-6)
        assert m["teacher_agreement"] == float((pred == teacher_pred).float().mean())
        # size and speed
        assert m["params"] == count_params(model)
        assert m["size_bytes"] == (cdir / checkpoint.WEIGHTS_FILE).stat().st_size
        assert m["flops"] == evaluate.flops(model, example) and m["macs"] == m["flops"] // 2
        assert m["latency_ms_b1"] > 0 and m["latency_ms_b64"] > 0
        assert m["compression"] == teacher_metrics["params"] / count_params(model)
        assert m["compression"] > 1  # pruning made it smaller
        assert m["teacher_retention"] == m["val_top1"] / teacher_metrics["val_top1"]  # the split the policy reads
        logits = evaluate.predict(model, test.x, norm)
        assert rep["test_correct"] == (logits.argmax(1) == test.y).int().tolist()  # the paired evidence's input
        assert sum(rep["test_correct"]) / len(test.y) == pytest.approx(m["test_top1"], abs=1e-7)  # float32 mean
        assert m["speedup_b1"] == teacher_metrics["latency_ms_b1"] / m["latency_ms_b1"]
        # the ONNX model logged next to the pt2 one: PyTorch's top-1 on every test image, logits within tolerance
        onnx_logits = tracking.load_logits_fn(rep["onnx_model_uri"])(test.x.float())
        pt_logits = evaluate.predict(model, test.x, norm)
        assert m["onnx_top1_agreement"] == 1.0 and (onnx_logits.argmax(1) == pt_logits.argmax(1)).all()
        assert m["onnx_max_abs_diff"] == pytest.approx(float((onnx_logits - pt_logits).abs().max()), abs=1e-6)
        assert m["onnx_max_abs_diff"] <= pipeline.cfg.export.parity_atol
        assert m["mac_ratio"] == teacher_metrics["macs"] / m["macs"]
        assert m["speedup"] == m["ort_speedup_b64"] and m["speedup_share"] == m["speedup"] / m["mac_ratio"]
        assert m["speedup_flagged"] == float(m["speedup_share"] < 0.5)  # (mac_ratio > 1: pruned)
        assert m["ort_latency_iqr_ms_b64"] >= 0 and m["ort_latency_ms_b1"] > 0


def test_evaluate_logs_the_metrics_and_the_confusion_matrix_on_the_candidates_run(pipeline, distilled, evaluated):
    _, student_dir = distilled
    reports, _ = evaluated
    client = pipeline.client()
    for rep in reports:
        run_id = read_info(student_dir / rep["name"])["run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key, value in rep["metrics"].items():
            history = client.get_metric_history(run_id, key)
            # logged once, at step 0, val_loss too: distillation's per-epoch curve is epoch/val_loss
            assert [(h.step, h.value) for h in history] == [(0, float(value))], key
            assert run.data.metrics[key] == float(value), key
        assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(run_id)}


# ------------------------------------------------------------------------------------------ register


def versions_of(client, name: str) -> list[int]:
    return sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))


def champion(client, name: str) -> int:
    return int(client.get_model_version_by_alias(name, "champion").version)


def lowered(report_path: Path, out: Path, factor: float) -> Path:
    """A copy of the report whose test metrics the gate reads are `factor` times the real ones."""
    reports = json.loads(report_path.read_text())
    for r in reports:
        r["metrics"]["test_top1"] *= factor
    out.write_text(json.dumps(reports))
    return out


def test_register_versions_every_model_and_moves_the_alias_only_for_a_better_pick(
    pipeline, distilled, evaluated, tmp_path
):
    _, student_dir = distilled
    reports, report_path = evaluated
    client = pipeline.client()
    model, teacher_model = "steps-student", "steps-teacher"
    names = {"registry.model_name": model, "registry.teacher_model_name": teacher_model}
    ctx = pipeline.context("steps-register", **names)  # a pipeline run of its own: its runs stay apart
    picky = pipeline.context("steps-register", **names, **{"registry.min_improvement": 1.0})
    assert picky.parent_id == ctx.parent_id
    assert versions_of(client, model) == [] and versions_of(client, teacher_model) == []  # fresh names
    teacher_info = read_info(pipeline.teacher_dir)
    half = lowered(report_path, tmp_path / "half.json", 0.5)

    # the policy's pick on validation metrics; test metrics play no part in it
    by_name = {r["name"]: r["metrics"] for r in reports}
    sel = registry.select(
        [registry.Candidate(n, by_name[n]) for n in NAMES], ctx.cfg.registry.policy, teacher_info["metrics"]
    )
    assert sel.best is not None, sel.rejected
    pick = sel.best.name
    score = by_name[pick]["test_top1"]
    assert score > 0  # half of it is then strictly worse
    slot = NAMES.index(pick)  # candidates are registered in the order they were trained, after the teacher

    def run(c: StepContext, report: Path, i: int) -> dict:
        out = tmp_path / f"decision-{i}.json"
        summary = register(c, pipeline.data_dir, pipeline.teacher_dir, [str(student_dir)], [str(report)], str(out))
        assert json.loads(out.read_text()) == summary
        return summary

    # 1. the first champion: the pick, whatever its score (here the lowered one)
    s1 = run(ctx, half, 1)
    d1 = s1["decision"]
    assert d1["versions"] == {NAMES[0]: 1, NAMES[1]: 2} and d1["teacher_version"] == 1
    assert (d1["selected"], d1["promoted"], d1["previous_champion"], d1["previous_score"]) == (pick, True, None, None)
    assert d1["champion_version"] == 1 + slot and d1["rejected"] == sel.rejected
    assert d1["reason"] == f"{pick} is the first champion (test_top1={score * 0.5:.4f})"
    assert champion(client, model) == 1 + slot
    assert versions_of(client, model) == [1, 2] and versions_of(client, teacher_model) == [1]
    assert s1["teacher"] == {"version": 1, **teacher_info["metrics"]}
    halved = {r["name"]: r["metrics"] for r in json.loads(half.read_text())}
    # the kd candidate also carries its paired gain over the same student's ce, on the same test images
    correct = {r["name"]: np.array(r["test_correct"], bool) for r in reports}
    gain = stats.paired_gain(correct["pruned60-kd"], correct["pruned60-ce"])
    gain_metrics = {
        "gain_vs_ce_test_top1": gain.diff,
        "gain_vs_ce_ci_low": gain.ci_low,
        "gain_vs_ce_ci_high": gain.ci_high,
        "gain_vs_ce_p_value": gain.p_value,
    }
    expected = {n: {"version": 1 + i, **halved[n]} for i, n in enumerate(NAMES)}
    expected["pruned60-kd"].update(gain_metrics)
    assert s1["candidates"] == expected
    weak = teacher_info["metrics"]["val_top1"] < by_name["pruned60-ce"]["val_top1"]
    assert s1["evidence"]["weak_teacher"] is weak
    assert s1["evidence"]["gains_vs_ce"]["pruned60-kd"]["baseline"] == "pruned60-ce"
    assert s1["evidence"]["gains_vs_ce"]["pruned60-kd"]["shown"] == gain.format()
    assert s1["model_name"] == model and s1["policy"] == ctx.cfg.registry.policy.model_dump()

    # 2. the real scores beat the lowered champion, but not by registry.min_improvement=1.0: the alias stays
    s2 = run(picky, report_path, 2)
    d2 = s2["decision"]
    assert d2["versions"] == {NAMES[0]: 3, NAMES[1]: 4} and d2["teacher_version"] == 2
    assert (d2["promoted"], d2["champion_version"], d2["previous_champion"]) == (False, 1 + slot, 1 + slot)
    assert d2["previous_score"] == score * 0.5  # the champion's stored score: same test data, not rescored
    assert champion(client, model) == 1 + slot
    assert versions_of(client, model) == [1, 2, 3, 4] and versions_of(client, teacher_model) == [1, 2]

    # 3. a better challenger without the margin: the alias moves to this run's version of the pick
    s3 = run(ctx, report_path, 3)
    d3 = s3["decision"]
    assert d3["versions"] == {NAMES[0]: 5, NAMES[1]: 6} and d3["teacher_version"] == 3
    assert (d3["selected"], d3["promoted"], d3["champion_version"]) == (pick, True, 5 + slot)
    assert (d3["previous_champion"], d3["previous_score"]) == (1 + slot, score * 0.5)
    assert d3["reason"] == f"{pick} test_top1={score:.4f} beats champion v{1 + slot} ({score * 0.5:.4f})"
    assert champion(client, model) == 5 + slot

    # 4. a worse challenger (the lowered scores again): new versions, the alias stays
    s4 = run(ctx, half, 4)
    d4 = s4["decision"]
    assert d4["versions"] == {NAMES[0]: 7, NAMES[1]: 8} and d4["teacher_version"] == 4
    assert (d4["promoted"], d4["champion_version"], d4["previous_score"]) == (False, 5 + slot, score)
    assert champion(client, model) == 5 + slot
    assert versions_of(client, model) == list(range(1, 9)) and versions_of(client, teacher_model) == [1, 2, 3, 4]

    # the register step's own run, and what a version carries
    runs = client.search_runs([ctx.experiment_id], f"tags.`mlflow.parentRunId` = '{ctx.parent_id}'")
    assert sorted(r.info.run_id for r in runs) == sorted(s["register_run_id"] for s in (s1, s2, s3, s4))
    runs = {r.info.run_id: r for r in runs}
    for s in (s1, s2, s3, s4):
        r = runs[s["register_run_id"]]
        assert r.info.run_name == "register" and r.data.tags[tracking.STEP_TAG] == "register"
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == ctx.parent_id
        assert r.data.tags["kdflow.promoted"] == str(s["decision"]["promoted"])
        assert r.data.tags["kdflow.selected"] == pick
        assert r.data.metrics["promoted"] == float(s["decision"]["promoted"])
        dst = tmp_path / "artifacts" / r.info.run_id
        dst.mkdir(parents=True)
        logged = json.loads(Path(client.download_artifacts(r.info.run_id, "decision.json", str(dst))).read_text())
        assert logged == {k: v for k, v in s.items() if k not in ("register_run_id", "report")}
    # the parent run carries the teacher's and the champion's headline metrics, the summary and the report
    parent = client.get_run(ctx.parent_id)
    assert parent.data.metrics["champion.test_top1"] == score and parent.data.metrics["champion.version"] == 5 + slot
    assert parent.data.metrics["teacher.test_top1"] == teacher_info["metrics"]["test_top1"]
    assert parent.data.metrics["champion.params"] == by_name[pick]["params"]
    assert parent.data.tags["kdflow.champion_version"] == str(5 + slot)
    files = {a.path for a in client.list_artifacts(ctx.parent_id, "report")}
    assert files == {"report/report.html", "report/report.md", "report/tradeoff.png"}
    assert s4["report"] == f"{parent.info.artifact_uri}/report/report.html"
    dst = tmp_path / "artifacts" / "parent"
    shown = json.loads(Path(client.download_artifacts(ctx.parent_id, tracking.SUMMARY_ARTIFACT, str(dst))).read_text())
    assert shown == {k: v for k, v in s4.items() if k != "report"}  # the last register step's
    mv = client.get_model_version(model, str(5 + slot))
    info = read_info(student_dir / pick)
    extra = gain_metrics if pick == "pruned60-kd" else {}
    flagged = {"kdflow.weak_teacher": "true"} if weak and pick == "pruned60-kd" else {}
    assert mv.tags == {
        **info["tags"],
        **flagged,
        "kdflow.teacher_model": teacher_model,
        "kdflow.teacher_version": "3",
        registry.TEST_HASH_TAG: pipeline.manifest["target_test_hash"],
        registry.ONNX_URI_TAG: {r["name"]: r for r in reports}[pick]["onnx_model_uri"],
        # lineage and a few headline metrics only; the rest stays on the run
        **{k: repr(float(v)) for k, v in {**by_name[pick], **extra}.items() if k in HEADLINE},
    }
    assert len([k for k in mv.tags if not k.startswith("kdflow.")]) == len(HEADLINE) - (0 if extra else 1)
    tv = client.get_model_version(teacher_model, "3")
    assert tv.tags == {
        registry.TEST_HASH_TAG: pipeline.manifest["target_test_hash"],
        registry.ONNX_URI_TAG: teacher_info["onnx_model_uri"],
        **{k: repr(float(v)) for k, v in teacher_info["metrics"].items() if k in HEADLINE},
    }


@pytest.mark.parametrize("where", ["registration", "after"])
def test_a_register_step_that_fails_leaves_no_version_and_no_alias_move(
    pipeline, distilled, evaluated, tmp_path, monkeypatch, where
):
    """A failure while registering the second candidate, or after the alias moved (writing the decision: a full
    disk), takes back every version the step registered and puts the alias back where it was."""
    _, student_dir = distilled
    _, report_path = evaluated
    client = pipeline.client()
    model, teacher_model = f"steps-undo-{where}", f"steps-undo-{where}-teacher"
    names = {"registry.model_name": model, "registry.teacher_model_name": teacher_model}
    ctx = pipeline.context(f"steps-undo-{where}", **names)
    first = register(
        ctx, pipeline.data_dir, pipeline.teacher_dir, [str(student_dir)], [str(report_path)], str(tmp_path / "a")
    )
    assert first["decision"]["promoted"] and versions_of(client, model) == [1, 2]
    champ = champion(client, model)
    better = lowered(report_path, tmp_path / "better.json", 1.01)  # beats the champion: the alias would move
    import mlflow

    real = mlflow.register_model
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args)
        if where == "registration" and len(calls) == 3:  # teacher, first candidate, then this one fails
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "register_model", flaky)
    moved = []
    if where == "after":  # the alias has moved to the better pick when writing the decision fails

        def full_disk(*args, **kwargs):
            moved.append(champion(client, model))
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(tracking, "log_dict", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        register(ctx, pipeline.data_dir, pipeline.teacher_dir, [str(student_dir)], [str(better)], str(tmp_path / "b"))
    assert versions_of(client, model) == [1, 2] and versions_of(client, teacher_model) == [1]
    assert champion(client, model) == champ
    assert not (tmp_path / "b").exists()
    if where == "after":
        assert moved and moved[0] != champ  # it had moved, and was put back
        history = registry.alias_history(client, ctx.cfg.registry)
        assert [(m["previous_version"], m["version"]) for m in history][-2:] == [(champ, moved[0]), (moved[0], champ)]
        assert history[-1]["reason"] == "undone: the register step failed"


def test_register_needs_a_report_for_every_candidate(pipeline, distilled, evaluated, tmp_path):
    _, student_dir = distilled
    reports, _ = evaluated
    client = pipeline.client()
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(reports[:1]))
    model = "steps-unreported"
    ctx = dataclasses.replace(pipeline.ctx, cfg=load_config(None, tiny_overrides(**{"registry.model_name": model})))
    before = len(all_runs(client, ctx))
    with pytest.raises(ValueError, match=f"candidate '{NAMES[1]}' has no evaluation report"):
        register(ctx, pipeline.data_dir, pipeline.teacher_dir, [str(student_dir)], [str(partial)], str(tmp_path / "d"))
    assert versions_of(client, model) == [] and len(all_runs(client, ctx)) == before
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------ INT8 candidates

INT8_NAMES = [f"{n}-int8" for n in NAMES]


@pytest.fixture(scope="module")
def quantized(pipeline, distilled):
    """The evaluate step of another pipeline run with `quantize.enabled` on the same candidates: (its context,
    the reports, the report file)."""
    _, student_dir = distilled
    ctx = pipeline.context(
        "steps-int8",
        **{
            "quantize.enabled": True,
            "quantize.calibration_images": 64,
            "registry.model_name": "int8-student",
            "registry.teacher_model_name": "int8-teacher",
        },
    )
    path = pipeline.tmp / "reports-int8" / "report.json"
    reports = evaluate_candidates(ctx, pipeline.data_dir, pipeline.teacher_dir, str(student_dir), str(path))
    return ctx, reports, path


def test_a_quantized_candidate_is_scored_in_onnx_runtime_in_a_run_of_its_own(pipeline, distilled, quantized):
    import mlflow.onnx
    import onnx

    _, student_dir = distilled
    ctx, reports, _ = quantized
    client = pipeline.client()
    assert [r["name"] for r in reports] == NAMES + INT8_NAMES  # the INT8 ones after the FP32 ones
    fp32 = {r["name"]: r for r in reports[:2]}
    test = data.load_imageset(pipeline.data_dir, "target", "test")
    val = data.load_imageset(pipeline.data_dir, "target", "val")
    train_x, _ = data.load_split(pipeline.data_dir, "target", "train")
    calibration = deploy.calibration_set(train_x, 64, ctx.cfg.seed)
    assert len(calibration) == 64
    for q in reports[2:]:
        src = fp32[q["quantized_from"]]
        assert q["name"] == f"{src['name']}-int8"
        m, s = q["metrics"], src["metrics"]
        logits = tracking.load_logits_fn(q["model_uri"])(test.x.float())  # the logged INT8 model, in ONNX Runtime
        assert q["test_correct"] == (logits.argmax(1) == test.y).int().tolist()
        assert m["test_top1"] == evaluate.accuracy(logits, test.y)
        val_logits = tracking.load_logits_fn(q["model_uri"])(val.x.float())
        assert m["val_top1"] == evaluate.accuracy(val_logits, val.y)
        assert m["int8_test_top1_drop"] == s["test_top1"] - m["test_top1"]
        assert (m["params"], m["macs"], m["flops"]) == (s["params"], s["macs"], s["flops"])
        assert m["latency_ms_b1"] == m["ort_latency_ms_b1"] and m["latency_ms_b64"] == m["ort_latency_ms_b64"]
        assert m["int8_speedup_b64"] == s["ort_latency_ms_b64"] / m["ort_latency_ms_b64"]
        assert m["mac_ratio"] == s["mac_ratio"] and m["speedup"] == m["ort_speedup_b64"]
        graph = mlflow.onnx.load_model(q["model_uri"])
        ops = {n.op_type for n in graph.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.graph.initializer)  # int8 weights
        assert m["size_bytes"] == m["onnx_size_bytes"] < s["onnx_size_bytes"]
        run = client.get_run(q["run_id"])
        assert run.info.status == "FINISHED" and run.info.run_name == q["name"]
        assert run.data.tags["mlflow.parentRunId"] == ctx.parent_id
        assert run.data.tags[registry.QUANTIZED_FROM_TAG] == src["name"]
        assert run.data.tags[registry.CALIBRATION_HASH_TAG] == deploy.data_hash(calibration)
        assert run.data.tags["kdflow.fp32_run_id"] == read_info(student_dir / src["name"])["run_id"]
        assert run.data.metrics["test_top1"] == m["test_top1"]
        assert json.loads(run.data.params["quantize.calibration_count"]) == 64


def test_quantized_candidates_are_registered_with_their_fp32_version_and_calibration_hash(
    pipeline, distilled, quantized, tmp_path
):
    _, student_dir = distilled
    ctx, reports, path = quantized
    client = pipeline.client()
    out = str(tmp_path / "summary.json")
    summary = register(ctx, pipeline.data_dir, pipeline.teacher_dir, [str(student_dir)], [str(path)], out)
    versions = summary["decision"]["versions"]
    assert versions == {NAMES[0]: 1, NAMES[1]: 2, INT8_NAMES[0]: 3, INT8_NAMES[1]: 4}
    assert set(summary["candidates"]) == set(NAMES + INT8_NAMES)
    by_name = {r["name"]: r for r in reports}
    for name in INT8_NAMES:
        mv = client.get_model_version("int8-student", str(versions[name]))
        src = by_name[name]["quantized_from"]
        assert mv.tags[registry.FP32_VERSION_TAG] == str(versions[src])
        assert mv.tags[registry.QUANTIZED_FROM_TAG] == src
        assert mv.tags[registry.CALIBRATION_HASH_TAG] == by_name[name]["tags"][registry.CALIBRATION_HASH_TAG]
        assert mv.tags[registry.ONNX_URI_TAG] == by_name[name]["model_uri"]
        assert mv.run_id == by_name[name]["run_id"]
    for name in NAMES:  # an FP32 version names its ONNX model and no FP32 version of its own
        mv = client.get_model_version("int8-student", str(versions[name]))
        assert mv.tags[registry.ONNX_URI_TAG] == by_name[name]["onnx_model_uri"]
        assert registry.FP32_VERSION_TAG not in mv.tags
    # an INT8 champion can be rescored (another run's test split): its logits come from ONNX Runtime
    test = data.load_imageset(pipeline.data_dir, "target", "test")
    q = by_name[INT8_NAMES[0]]
    uri = f"models:/int8-student/{versions[INT8_NAMES[0]]}"
    logits = register_step._logits(ctx.cfg, pipeline.manifest, test, uri)
    assert (logits.argmax(1) == test.y).int().tolist() == q["test_correct"]


# ------------------------------------------------------------------------------------------ finalize


def test_finalize_a_failed_pipeline_marks_stale_children_and_the_parent_failed(pipeline):
    client = pipeline.client()
    ctx = pipeline.context("steps-finalize-failed")
    with ctx.child("done", "teacher"):
        pass
    stale = tracking.open_child_run(ctx.experiment_id, ctx.parent_id, "killed", "distill", {})
    assert client.get_run(stale).info.status == "RUNNING"
    assert finalize(ctx, succeeded=False, detail="boom") == ["killed"]
    children = runs_under(client, ctx)
    assert {n: r.info.status for n, r in children.items()} == {"done": "FINISHED", "killed": "FAILED"}
    parent = client.get_run(ctx.parent_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["kdflow.outcome"] == "failed" and parent.data.tags["kdflow.outcome_detail"] == "boom"


def test_finalize_a_succeeded_pipeline_still_fails_a_killed_child(pipeline):
    client = pipeline.client()
    ctx = pipeline.context("steps-finalize-succeeded")
    tracking.open_child_run(ctx.experiment_id, ctx.parent_id, "killed", "distill", {})
    assert finalize(ctx, succeeded=True) == ["killed"]
    assert runs_under(client, ctx)["killed"].info.status == "FAILED"
    parent = client.get_run(ctx.parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["kdflow.outcome"] == "succeeded" and "kdflow.outcome_detail" not in parent.data.tags
    assert finalize(ctx, succeeded=True) == []  # nothing left RUNNING


def test_register_refuses_a_report_without_per_image_results_before_writing(pipeline, distilled, evaluated, tmp_path):
    _, student_dir = distilled
    reports, _ = evaluated
    client = pipeline.client()
    stripped = tmp_path / "stripped.json"
    stripped.write_text(json.dumps([{k: v for k, v in r.items() if k != "test_correct"} for r in reports]))
    model = "steps-no-correct"
    ctx = dataclasses.replace(pipeline.ctx, cfg=load_config(None, tiny_overrides(**{"registry.model_name": model})))
    before = len(all_runs(client, ctx))
    with pytest.raises(ValueError, match=f"candidate '{NAMES[0]}': its evaluation report has no per-image test"):
        register(ctx, pipeline.data_dir, pipeline.teacher_dir, [str(student_dir)], [str(stripped)], str(tmp_path / "d"))
    assert versions_of(client, model) == [] and len(all_runs(client, ctx)) == before
