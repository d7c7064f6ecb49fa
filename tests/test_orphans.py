"""No orphans: after a `kill -9` of a local `kdflow run`, the next run on the same home ends the runs the killed
one left RUNNING as FAILED, with a reason naming it, and removes its record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.config import tiny_overrides

pytestmark = pytest.mark.slow


def _argv(home: Path, **extra) -> list[str]:
    sets = []
    for key, value in tiny_overrides(**extra).items():
        sets += ["--set", f"{key}={json.dumps(value)}"]
    return [sys.executable, "-m", "kdflow.cli", "run", "--home", str(home), *sets]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "KDFLOW_HOME", "KDFLOW_LOCAL_RUN")}


def test_the_next_run_closes_what_a_killed_run_left_running(tmp_path):
    from mlflow import MlflowClient

    home = tmp_path / "home"
    log = tmp_path / "killed.log"
    with log.open("w") as out:  # a long teacher phase, killed while it trains
        proc = subprocess.Popen(
            _argv(home, **{"teacher.pretrain": {"epochs": 200}}),
            stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "teacher pretrain epoch" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, kfp.local, the step server and its children
        proc.wait(timeout=30)
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdflow-digits").experiment_id
    running = {r.info.run_name for r in client.search_runs([exp], "attributes.status = 'RUNNING'")}
    assert "teacher" in running and len(running) == 2  # the parent run and the teacher's, left behind
    assert (home / ".kdflow-active-run.json").exists()

    again = subprocess.run(_argv(home), capture_output=True, text=True, env=_env(), timeout=600)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "an earlier kdflow run on this home was killed: marked its 2 unfinished MLflow runs FAILED" in again.stdout
    assert client.search_runs([exp], "attributes.status = 'RUNNING'") == []
    closed = [r for r in client.search_runs([exp]) if r.info.run_name in running and r.info.status == "FAILED"]
    assert {r.info.run_name for r in closed} == running
    assert all(f"(pid {proc.pid})" in r.data.tags["kdflow.failure_reason"] for r in closed)
    assert not (home / ".kdflow-active-run.json").exists()
