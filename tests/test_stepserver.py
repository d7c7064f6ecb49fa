"""The local runner's step server: steps forked from one warm process behave like steps run in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdflow import data
from kdflow.config import load_config
from kdflow.runner import entrypoints, stepserver

pytestmark = pytest.mark.skipif(not stepserver.available(), reason="the step server needs fork (Linux)")

CALL = """
import json, sys
from kdflow.runner import entrypoints
from kdflow.runner.stepserver import run_step
print(json.dumps(run_step(entrypoints.data_prep, config_json=sys.argv[1], data=sys.argv[2])))
"""


def _step_process(config_json: str, out: str, env: dict, cwd=None) -> subprocess.CompletedProcess:
    """A step's own process, as kfp.local starts it: it only asks the server."""
    return subprocess.run(
        [sys.executable, "-c", CALL, config_json, out], capture_output=True, text=True, env=env, timeout=300, cwd=cwd
    )


@pytest.mark.slow  # a warm step server: imports torch, MLflow and every step
def test_forked_step_equals_in_process_step_and_writes_to_the_callers_output(tmp_path, monkeypatch):
    monkeypatch.delenv(stepserver.SERVER_ENV, raising=False)
    cfg = load_config(None, {})
    # no server: in-process
    local = stepserver.run_step(entrypoints.data_prep, config_json=cfg.to_json(), data=str(tmp_path / "in-process"))
    assert local["content_hash"] == data.read_manifest(tmp_path / "in-process")["content_hash"]

    with stepserver.StepServer(tmp_path / "server.log") as server:
        assert os.environ[stepserver.SERVER_ENV] == server.sock
        env = dict(os.environ)
        # a relative output path means the step process's working directory, not the server's
        good = _step_process(cfg.to_json(), "forked", env, cwd=tmp_path)
        bad_cfg = load_config(None, {"data.source": f"mnist-idx:{tmp_path / 'nowhere'}"})
        bad = _step_process(bad_cfg.to_json(), str(tmp_path / "bad"), env)
    assert stepserver.SERVER_ENV not in os.environ and server.proc.returncode is not None  # stopped
    assert good.returncode == 0, good.stderr
    lines = good.stdout.strip().splitlines()
    # the forked child wrote its timing line to the step process's own stdout, then the step printed the result
    assert lines[0].startswith("[kdflow-timing] step=data-prep compute_s=")
    assert json.loads(lines[-1]) == local
    assert data.read_manifest(tmp_path / "forked")["content_hash"] == local["content_hash"]
    # a failing step fails its own process, with the original error in its log
    assert bad.returncode == 1
    assert f"DataError: mnist-idx directory not found: {tmp_path / 'nowhere'}" in bad.stderr
    assert "StepFailed: step data_prep failed: DataError" in bad.stderr
    assert not (tmp_path / "bad" / "manifest.json").exists()


@pytest.mark.slow  # a warm step server: imports torch, MLflow and every step
def test_warm_server_holds_no_threads_before_forking():
    """fork() copies only the calling thread: the warmed-up server must have no other."""
    code = (
        "import threading; from kdflow.runner import stepserver; stepserver._warm_up(); print(threading.active_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_client_reports_a_server_that_failed_to_start(tmp_path):
    sock = tmp_path / "s.sock"
    (tmp_path / "s.sock.failed").write_text("ImportError: no module named torch")
    with pytest.raises(stepserver.StepFailed, match="failed to start: ImportError: no module named torch"):
        stepserver._connect(str(sock), timeout_s=5)


def test_no_server_when_off_and_steps_run_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv(stepserver.SERVER_ENV, "off")
    with stepserver.StepServer(tmp_path / "log") as server:
        assert server.proc is None and os.environ[stepserver.SERVER_ENV] == "off"
        # the step processes see "off" too: they run the step themselves instead of looking for a socket
        result = stepserver.run_step(
            entrypoints.data_prep, config_json=load_config(None, {}).to_json(), data=str(tmp_path / "data")
        )
    assert result["content_hash"] == data.read_manifest(tmp_path / "data")["content_hash"]


@pytest.mark.slow  # a warm step server: imports torch, MLflow and every step
def test_sigterm_removes_the_socket_and_exits_zero(tmp_path):
    """Stopping the server (what StepServer's exit does) removes its socket itself and exits with 0."""
    import signal
    import time

    sock = tmp_path / "steps.sock"
    proc = subprocess.Popen([sys.executable, "-m", "kdflow.runner.stepserver", str(sock)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the server never listened"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not sock.exists() and tmp_path.is_dir()
    assert stepserver.READY in proc.stderr.read().decode()
