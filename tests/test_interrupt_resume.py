"""Clean interruption, no orphans and resume, on real local runs: a run killed with `kill -9` mid-teacher, its
resume (which closes what the killed run left RUNNING) killed again in its distill step's process, then resumed
again, ends with exactly the weights and metrics of the same run left alone; Ctrl-C and SIGTERM stop a run at
once, leaving no RUNNING run, no process, no lock and no socket."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.config import tiny_overrides

pytestmark = pytest.mark.slow

# long enough phases to stop in the middle of; a checkpoint at every epoch's end
LONGER = {
    "teacher.pretrain": {"epochs": 8},
    "distill.train": {"epochs": 12, "epoch_over": "target"},
    "checkpoint": {"every_s": 0, "max_share": 1e9},
}
TIMING = re.compile(r"latency|speedup|_ms|_s$|seconds|size_mb")  # measured speeds differ run to run; the rest may not


def _argv(home: Path, *extra: str) -> list[str]:
    sets = []
    for key, value in tiny_overrides(**LONGER).items():
        sets += ["--set", f"{key}={json.dumps(value)}"]
    return [sys.executable, "-m", "kdflow.cli", "run", "--home", str(home), *sets, *extra]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "KDFLOW_HOME", "KDFLOW_LOCAL_RUN")}


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # its own session: a signal to its group reaches what a terminal's Ctrl-C would
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def _client(home: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    return client, client.get_experiment_by_name("kdflow-digits").experiment_id


def _runs(home: Path) -> dict[str, object]:
    client, exp = _client(home)
    return {r.info.run_name: r for r in client.search_runs([exp])}


def _weights(home: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The teacher's and every candidate's weights from the run's folder under the local pipeline root."""
    (run_dir,) = [d for d in (home / "pipeline-root").iterdir() if (d / "register").is_dir()]
    found = {"teacher": run_dir / "train-teacher" / "teacher" / "model.pt"}
    for model in run_dir.glob("for-loop-*/distill/student/*/model.pt"):
        found[model.parent.name] = model
    return {name: torch.load(path, weights_only=True) for name, path in found.items()}


def _metrics(home: Path) -> dict[str, dict[str, float]]:
    return {
        name: {k: v for k, v in r.data.metrics.items() if not TIMING.search(k)}
        for name, r in _runs(home).items()
        if r.data.tags.get("kdflow.step") in ("teacher", "distill")
    }


def _curves(home: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Each training run's per-epoch curves (not timings): every (epoch, value) point logged, in order."""
    client, _ = _client(home)
    return {
        name: {
            k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
            for k in r.data.metrics
            if k.startswith(("pretrain/", "finetune/", "epoch/")) and not TIMING.search(k)
        }
        for name, r in _runs(home).items()
        if r.data.tags.get("kdflow.step") in ("teacher", "distill")
    }


def _assert_stopped_cleanly(home: Path, proc: subprocess.Popen) -> None:
    """No RUNNING run, no process of the run's session, the home's lock free, no record of a live run."""
    assert [n for n, r in _runs(home).items() if r.info.status == "RUNNING"] == []
    with pytest.raises(ProcessLookupError):  # every process the run started is gone with it
        for _ in range(50):
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
    with (home / ".kdflow-run.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if it were still held
    assert not (home / ".kdflow-active-run.json").exists()


def _step_process(kdflow_pid: int) -> int:
    """The process running the current step: a child of the step server, itself under the kdflow command."""
    from kdflow.runtime.procs import descendants

    def cmdline(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()

    servers = [p for p in descendants(kdflow_pid) if "kdflow.runner.stepserver" in cmdline(p)]
    (step,) = [p for p in descendants(servers[0])]
    return step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    home = tmp_path_factory.mktemp("whole") / "home"
    done = subprocess.run(_argv(home), capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    return home, done


def test_a_run_shows_its_log_steps_and_epochs_with_eta(uninterrupted):
    """The console of `kdflow run` in a pipe: plain lines, step k/n of the 7 tasks, epoch lines with ETA, the run
    log's path first; MLflow's store set-up only in the log."""
    from kdflow.runner import progress
    from kdflow.tracking import PROGRESS_EVENT

    home, proc = uninterrupted
    lines = proc.stdout.splitlines()
    logs = sorted((home / "logs").glob("run-*.log"))
    assert len(logs) == 1 and f"run log: {logs[0]}" in lines[:4]  # after the run's header (which may wrap)
    assert lines.index(f"{progress.SETTING_UP} …") == lines.index(f"run log: {logs[0]}") - 1
    steps = [line.split("] ", 1)[1] for line in lines if "] step " in line]
    assert steps[0] == "step 1/7 data-prep started" and steps[-1].endswith("(7/7 done)")
    assert len([s for s in steps if s.endswith(" started")]) == 7
    epochs = [line for line in lines if " epoch " in line and "ETA" in line]
    assert any("teacher pretrain epoch 8/8 " in line and line.endswith("ETA 0:00:00)") for line in epochs), lines
    assert any("distill pruned60-kd epoch 12/12 " in line for line in epochs), lines
    assert "database tables" not in proc.stdout + proc.stderr
    log = logs[0].read_text()
    assert "Creating initial MLflow database tables" in log and PROGRESS_EVENT in log


@pytest.mark.timeout(1800)  # four runs (with the module's uninterrupted one): minutes on a busy 2-core machine
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, uninterrupted):
    home = tmp_path / "home"
    # 1. `kill -9` of the whole command (its process group) mid-pretraining: its runs are left RUNNING
    proc = _start(_argv(home), tmp_path / "killed.log")
    _wait_for(proc, tmp_path / "killed.log", "teacher pretrain epoch 3/8")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert sorted(n for n, r in _runs(home).items() if r.info.status == "RUNNING")[-1] == "teacher"
    assert len([r for r in _runs(home).values() if r.info.status == "RUNNING"]) == 2  # and the parent run
    assert (home / ".kdflow-active-run.json").exists()
    teacher_run = _runs(home)["teacher"].info.run_id

    # 2. resumed: the orphans are closed, then continued: the teacher goes on from its checkpoint in the same
    # MLflow run; the distill step's process is killed mid-training: the run fails
    proc = _start(_argv(home, "--resume"), tmp_path / "resumed.log")
    _wait_for(proc, tmp_path / "resumed.log", "distill pruned60-kd epoch 4/12")
    os.kill(_step_process(proc.pid), signal.SIGKILL)
    assert proc.wait(timeout=120) == 1
    log = (tmp_path / "resumed.log").read_text()
    assert "an earlier kdflow run on this home was killed: marked its 2 unfinished MLflow runs FAILED" in log
    assert "data-prep: reused the output of the interrupted run" in log
    assert re.search(r"pretrain: resumed after epoch [1-8] from its checkpoint", log), log[-3000:]
    assert f"teacher: continuing the MLflow run {teacher_run}" in log
    runs = _runs(home)
    assert [n for n, r in runs.items() if r.info.status == "RUNNING"] == []
    unfinished = {n for n, r in runs.items() if r.info.status == "FAILED"}
    assert {"pruned60-kd", "pruned60-ce"} <= unfinished and len(unfinished) == 3  # and the parent run
    assert json.loads((home / ".kdflow-last-run.json").read_text())["status"] == "failed"

    # 3. resumed again: finished steps reused, distill continues from its checkpoint, the run ends as if whole
    again = subprocess.run(_argv(home, "--resume"), capture_output=True, text=True, env=_env(), timeout=900)
    assert again.returncode == 0, again.stdout[-3000:]
    step_log = sorted((home / "logs").glob("run-*.log"))[-1].read_text()
    for step in ("data-prep", "teacher", "prune"):
        assert f"{step}: reused the output of the interrupted run" in step_log
    assert re.search(r"seed0-target: resumed after epoch ([3-9]|1[0-2]) from its checkpoint", step_log)
    final = _runs(home)
    assert [n for n, r in final.items() if r.info.status != "FINISHED"] == []
    assert {n: final[n].info.run_id for n in unfinished} == {n: runs[n].info.run_id for n in unfinished}
    client, _ = _client(home)
    parent = next(r for r in final.values() if r.data.tags.get("kdflow.step") == "pipeline")
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "checkpoints")] == []  # deleted at the end

    whole = uninterrupted[0]
    expected, got = _weights(whole), _weights(home)
    assert sorted(got) == sorted(expected) == ["pruned60-ce", "pruned60-kd", "teacher"]
    for name in expected:
        assert all(torch.equal(got[name][k], v) for k, v in expected[name].items()), name
    assert _metrics(home) == _metrics(whole)
    curves = _curves(home)  # one point per epoch: none logged twice by the killed and the resumed process
    assert len(curves["teacher"]["pretrain/val_top1"]) == 8 and len(curves["pruned60-kd"]["epoch/val_top1"]) == 12
    assert curves == _curves(whole)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_a_run_at_once(tmp_path, sig):
    home = tmp_path / "home"
    proc = _start(_argv(home), tmp_path / "stopped.log")
    _wait_for(proc, tmp_path / "stopped.log", "teacher pretrain epoch 1/8")
    asked = time.monotonic()
    if sig == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
    else:
        proc.terminate()  # SIGTERM to the kdflow command alone, as a process manager sends it
    assert proc.wait(timeout=60) == {"SIGINT": 130, "SIGTERM": 143}[sig]
    print(f"{sig} to exit: {time.monotonic() - asked:.2f} s")
    _assert_stopped_cleanly(home, proc)
    runs = _runs(home)
    assert {n: r.info.status for n, r in runs.items() if r.info.status != "FINISHED"} == {
        "teacher": "KILLED",
        next(n for n, r in runs.items() if r.data.tags.get("kdflow.step") == "pipeline"): "KILLED",
    }
    assert all(f"interrupted by {sig}" in r.data.tags["kdflow.failure_reason"] for r in runs.values()
               if r.info.status == "KILLED")  # fmt: skip
    assert (
        "marked 2 MLflow runs KILLED; continue it with: kdflow run --resume" in (tmp_path / "stopped.log").read_text()
    )
    assert json.loads((home / ".kdflow-last-run.json").read_text())["status"] == "interrupted"
