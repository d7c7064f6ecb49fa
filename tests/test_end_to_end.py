"""The README's main command on tiny settings: three local pipeline runs against one embedded MLflow store.

Run 1 promotes the first champion; run 2 (students not trained at all) registers worse versions and leaves the
alias where it was; run 3 (students trained longer) beats the champion and moves the alias.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from kdflow.config import load_config
from tests.helpers.config import tiny_overrides

pytestmark = pytest.mark.slow

MODEL = "kdflow-digits-student"
TEACHER = "kdflow-digits-teacher"


def _run(tmp_path, name: str, distill_epochs: int) -> subprocess.CompletedProcess:
    cfg = load_config(None, tiny_overrides(**{"distill.train": {"epochs": distill_epochs, "epoch_over": "target"}}))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "kdflow.cli", "run", "--config", str(path), "--home", str(tmp_path / "home")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _champion(client: MlflowClient):
    mv = client.get_model_version_by_alias(MODEL, "champion")
    return int(mv.version), float(mv.tags["test_top1"])


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "kdflow.cli", *args, "--home", str(tmp_path / "home")],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_local_pipeline_promotes_then_keeps_then_moves_champion(tmp_path):
    first = _run(tmp_path, "first", distill_epochs=2)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    client = MlflowClient()

    # one parent run per pipeline run, a child per step and per candidate, all finished
    exp = client.get_experiment_by_name("kdflow-digits")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["kdflow.outcome"] == "succeeded"
    assert parent.data.params["distill.train.epochs"] == "2"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"data-prep", "teacher", "prune", "pruned60-kd", "pruned60-ce", "register"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    kd = children["pruned60-kd"]
    assert len(client.get_metric_history(kd.info.run_id, "epoch/val_top1")) == 2  # one point per epoch
    assert {"test_top1", "latency_ms_b1", "teacher_agreement", "test_ece", "flops"} <= set(kd.data.metrics)
    assert kd.data.tags["kdflow.loss"] == "kd" and kd.data.tags["kdflow.prune_ratio"] == "0.6"
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(kd.info.run_id)}
    assert len(client.get_metric_history(children["teacher"].info.run_id, "pretrain/val_top1")) == 3

    # both candidates registered, teacher registered separately, champion set
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert len(client.search_model_versions(f"name='{TEACHER}'")) == 1
    v1 = client.get_model_version(MODEL, "1")
    assert v1.tags["kdflow.teacher_version"] == "1" and v1.tags["kdflow.data_hash"]
    assert v1.tags["kdflow.pipeline_run_id"] == parent.data.tags["kdflow.pipeline_run_id"]
    champ_version, champ_score = _champion(client)
    # the champion is the stated policy's pick on the registered metrics (val accuracy, compression >= 4x)
    from kdflow.config import PolicyConfig
    from kdflow.registry import Candidate, select

    keys = ("val_top1", "val_loss", "params", "latency_ms_b1")
    cands = [Candidate(v.tags["kdflow.candidate"], {k: float(v.tags[k]) for k in keys}) for v in versions]
    (t,) = client.search_model_versions(f"name='{TEACHER}'")
    best = select(cands, PolicyConfig(), {k: float(t.tags[k]) for k in ("params", "val_top1")}).best
    by_name = {v.tags["kdflow.candidate"]: int(v.version) for v in versions}
    assert champ_version == by_name[best.name]
    assert f"promoted: {best.name} is the first champion" in first.stdout

    # the parent run compares at a glance: the champion's and the teacher's headline metrics, the report
    assert parent.data.metrics["champion.test_top1"] == champ_score
    assert parent.data.metrics["champion.version"] == champ_version
    assert parent.data.metrics["teacher.test_top1"] == float(t.tags["test_top1"])
    (line,) = [ln for ln in first.stdout.splitlines() if ln.startswith("report: ")]
    html = line.removeprefix("report: ")
    assert html == f"{tmp_path}/home/artifacts/{parent.info.run_id}/artifacts/report/report.html"
    assert sorted(p.name for p in Path(html).parent.iterdir()) == ["report.html", "report.md", "tradeoff.png"]
    # the MLflow records: the experiment's kind, provenance on every run, one name per quantity
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for r in [parent, *children.values()]:
        assert {"kdflow.version", "mlflow.user", "mlflow.source.git.commit"} <= set(r.data.tags), r.info.run_name
    assert "best_val_top1" not in kd.data.metrics and "val_acc" not in kd.data.metrics
    assert "kdflow.temperature" not in children["pruned60-ce"].data.tags  # ce reads no temperature
    # `kdflow show` prints the run's table and decision again, from MLflow
    shown = _cli(tmp_path, "show")
    assert shown.stdout.startswith(f"pipeline run {parent.info.run_name} ({parent.info.run_id}), FINISHED")
    table = first.stdout[first.stdout.index(f"{MODEL}: teacher and candidates") :]
    table = table[: table.index("\nreport: ") + 1]
    assert shown.stdout.split("\n", 1)[1].lstrip() == table.lstrip()

    # the registered champion is a servable model: raw pixels in, logits out, any batch size
    import torch

    served = mlflow.pytorch.load_model(f"models:/{MODEL}@champion")
    assert served(torch.rand(5, 1, 8, 8) * 255).shape == (5, 10)

    # a worse run: registered, champion unchanged
    second = _run(tmp_path, "worse", distill_epochs=0)
    assert "champion unchanged" in second.stdout
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'")) == [1, 2, 3, 4]
    assert _champion(client) == (champ_version, champ_score)

    # a better run: the alias moves to one of its versions
    third = _run(tmp_path, "better", distill_epochs=12)
    assert "promoted" in third.stdout
    new_version, new_score = _champion(client)
    assert new_version in (5, 6)
    assert new_score > champ_score


# the pipeline without `kdflow run`'s data check, which would refuse this data before the pipeline starts
RUN_PIPELINE = """
import sys
from pathlib import Path
from kdflow.config import load_config
from kdflow.pipelines.local import PipelineFailed, run_local
try:
    run_local(load_config(None, {"data": {"source": sys.argv[1]}}), Path(sys.argv[2]))
except PipelineFailed as err:
    print("pipeline failed:", err)
    sys.exit(1)
"""


def test_a_failing_step_fails_the_pipeline_cleanly(tmp_path):
    """A step that fails (data prep, on files it cannot read): non-zero exit, the bad file named, the parent run
    FAILED, nothing registered. (`kdflow run` finds such files before the pipeline starts: `test_fail_fast`.)"""
    missing = tmp_path / "broken-mnist"
    missing.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (missing / name).write_bytes(b"not an IDX file")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_PIPELINE, f"mnist-idx:{missing}", str(tmp_path / "home")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pipeline failed" in proc.stdout and str(missing / "train-images-idx3-ubyte") in proc.stdout
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    client = MlflowClient()
    assert client.search_registered_models() == []
    runs = client.search_runs([client.get_experiment_by_name("kdflow-digits").experiment_id])
    # data prep talks to no store; the exit handler still records the failed pipeline run
    assert [r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags] == []
    (parent,) = runs
    assert parent.info.status == "FAILED"
    assert parent.data.tags["kdflow.outcome"] == "failed"
    assert parent.data.tags["kdflow.outcome_detail"].startswith("FAILED")
