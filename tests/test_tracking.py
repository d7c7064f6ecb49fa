"""Closing the pipeline's MLflow run from the exit handler, on a real SQLite store."""

from __future__ import annotations

from mlflow import MlflowClient

from kdflow import tracking


def _pipeline_with_children(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment("close", uri)
    parent = tracking.parent_run_id(exp, "job-1", "job-1", {"seed": "0"})
    with tracking.child_run(exp, parent, "teacher", "teacher"):
        pass
    client = MlflowClient()
    # a step whose pod was killed: its run never ended
    killed = client.create_run(exp, run_name="distill-a", tags={"mlflow.parentRunId": parent}).info.run_id
    return client, exp, parent, killed


def test_failed_pipeline_fails_parent_and_runs_left_running(tmp_path):
    client, exp, parent, killed = _pipeline_with_children(tmp_path)
    stale = tracking.close_pipeline_run(exp, parent, succeeded=False, detail="FAILED: Task distill failed.")
    assert stale == ["distill-a"]
    assert client.get_run(killed).info.status == "FAILED"
    run = client.get_run(parent)
    assert run.info.status == "FAILED"
    assert run.data.tags["kdflow.outcome"] == "failed"
    assert run.data.tags["kdflow.outcome_detail"] == "FAILED: Task distill failed."
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([exp])}
    assert statuses["teacher"] == "FINISHED"  # finished steps keep their status


def test_succeeded_pipeline_finishes_parent_and_reuses_it(tmp_path):
    client, exp, parent, killed = _pipeline_with_children(tmp_path)
    assert tracking.parent_run_id(exp, "job-1", "job-1", {}) == parent  # found by the job id tag, not recreated
    # the killed pod's step was retried and the pipeline succeeded: the dead attempt's run still ends FAILED
    assert tracking.close_pipeline_run(exp, parent, succeeded=True) == ["distill-a"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["kdflow.outcome"] == "succeeded"
    assert client.get_run(killed).info.status == "FAILED"
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([exp])}
    assert statuses["teacher"] == "FINISHED"  # finished steps keep their status


def test_params_logged_by_run_id_leave_the_run_running(tmp_path):
    client, exp, parent, running = _pipeline_with_children(tmp_path)
    params = {f"p{i}": i for i in range(150)}  # more than one log_batch chunk
    params["long"] = "x" * 7000
    tracking.log_params(params, run_id=running)
    run = client.get_run(running)
    assert run.info.status == "RUNNING"  # a pod killed while training leaves it RUNNING, for finalize to fail
    assert run.data.params["p149"] == "149" and len(run.data.params) == 151
    assert run.data.params["long"] == "x" * 6000


def test_experiments_are_tagged_as_training_experiments_for_the_mlflow_ui(tmp_path):
    """MLflow 3's UI reads `mlflow.experimentKind` (its JS bundle maps "custom_model_development" to the
    machine-learning view; untagged, it infers GenAI): new experiments get it, older ones on first use."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment("kind", uri)
    client = MlflowClient()
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert tracking.ensure_experiment("made-before", uri) == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_every_run_carries_the_kdflow_version_git_commit_and_user(tmp_path, monkeypatch):
    from kdflow import __version__

    monkeypatch.setenv("KDFLOW_USER", "ana")
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "0123abcd")  # where the source has no .git (an image)
    client, exp, parent, opened = _pipeline_with_children(tmp_path)
    opened = tracking.open_child_run(exp, parent, "cand", "distill", {"kdflow.candidate": "cand"})
    runs = client.search_runs([exp])
    assert len(runs) == 4  # parent, teacher (child_run), the killed step (a bare run, not kdflow's), cand
    expected = {"kdflow.version": __version__, "mlflow.user": "ana", "mlflow.source.git.commit": "0123abcd"}
    for run_id in (parent, opened, *[r.info.run_id for r in runs if r.info.run_name == "teacher"]):
        tags = client.get_run(run_id).data.tags
        assert {k: tags.get(k) for k in expected} == expected, client.get_run(run_id).info.run_name


def test_the_git_commit_is_read_from_the_checkout(monkeypatch):
    import subprocess
    from pathlib import Path

    monkeypatch.delenv(tracking.GIT_COMMIT_ENV, raising=False)
    src = Path(tracking.__file__).parent
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert tracking.git_commit() == (head.stdout.strip() if head.returncode == 0 else None)


def test_epoch_curves_are_logged_under_their_prefix_with_one_name_per_quantity(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment("curves", uri)
    with mlflow.start_run(experiment_id=exp) as run:
        log = tracking.epoch_logger("x", 2, "epoch/")
        log(1, {"train_loss": 1.0, "val_acc": 0.5, "val_loss": 0.9})
        log(2, {"train_loss": 0.8, "val_acc": 0.75, "val_loss": 0.7})
    client = MlflowClient()
    assert set(client.get_run(run.info.run_id).data.metrics) == {"epoch/train_loss", "epoch/val_top1", "epoch/val_loss"}
    history = client.get_metric_history(run.info.run_id, "epoch/val_top1")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.75)]


def test_a_resumed_fit_does_not_log_an_epoch_twice(tmp_path):
    """Epochs 1-3 reached the run before a kill (checkpoint after 2); the resumed fit trains 3-5 again and its
    logger sends only 4 and 5: one point per epoch, as if never interrupted."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment("resumed", uri)
    client = MlflowClient()
    run_id = client.create_run(exp).info.run_id
    killed = tracking.epoch_logger("x", 5, "epoch/", run_id)
    for epoch in (1, 2, 3):
        killed(epoch, {"train_loss": 1.0 / epoch, "val_acc": 0.1 * epoch})
    killed.flush()
    resumed = tracking.epoch_logger("x", 5, "epoch/", run_id)
    for epoch in (3, 4, 5):
        resumed(epoch, {"train_loss": 1.0 / epoch, "val_acc": 0.1 * epoch})
    resumed.close()
    for key, value in (("epoch/val_top1", lambda e: 0.1 * e), ("epoch/train_loss", lambda e: 1.0 / e)):
        history = client.get_metric_history(run_id, key)
        assert sorted((m.step, m.value) for m in history) == [(e, value(e)) for e in (1, 2, 3, 4, 5)], key
    fresh = tracking.epoch_logger("x", 1, "other/", run_id)  # keys the run does not hold: nothing dropped
    fresh(1, {"val_acc": 0.5})
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "other/val_top1")] == [(1, 0.5)]
    assert mlflow.active_run() is None
