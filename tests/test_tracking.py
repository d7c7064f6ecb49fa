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
