"""Run pipeline steps in children forked from one warm process: the local runner's cure for start-up cost.

kfp.local starts a fresh Python process per step, and a step that imports torch, mlflow and MLflow's store
spends seconds on that before its first useful instruction, then seconds more tearing the interpreter down.
The local runner therefore starts one server that imports all of it once; each step's process (the KFP
executor, which only imports kfp) sends its call over a Unix socket together with its stdout/stderr, and the
server forks a child that runs the call with the already-imported modules, writes the result back and leaves
with `os._exit`. The server itself never runs torch ops, opens a store or starts a thread, so forking it is
safe. Without `KDFLOW_STEP_SERVER` in the environment (a pod, a test) `run_step` simply calls the entry point
in-process. Linux only (fork); elsewhere the local runner runs steps the plain way.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

SERVER_ENV = "KDFLOW_STEP_SERVER"  # path of the server's Unix socket
ENTRYPOINTS = "kdflow.runner.entrypoints"  # the only module whose functions the server runs
READY = "kdflow step server ready"
FORWARDED_ENV = "KDFLOW_"  # the step's own kdflow variables (set after the server started) travel with its call


class StepFailed(RuntimeError):
    """The step raised in the server's child; its traceback is already in the step's log."""


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(socket, "send_fds")


class StepServer:
    """The local runner's server, as a context manager: started at once, so its imports overlap the caller's
    own set-up, and announced to the steps through the environment right away (a step's first connection
    waits until it listens). Without fork support, or with KDFLOW_STEP_SERVER=off, there is none and steps
    start cold."""

    def __init__(self, log_path: str | os.PathLike):
        import subprocess
        import tempfile

        self.log_path, self.proc, self.sock_dir = Path(log_path), None, None
        if not available() or os.environ.get(SERVER_ENV):  # "off", or a server already announced
            return
        self.sock_dir = tempfile.mkdtemp(prefix="kdflow-")  # Unix socket paths must stay short
        self.sock = os.path.join(self.sock_dir, "steps.sock")
        with self.log_path.open("a") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "kdflow.runner.stepserver", self.sock], stderr=err)
        os.environ[SERVER_ENV] = self.sock

    def __enter__(self) -> StepServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, reason: str | None = None) -> None:
        """Stop the server and remove its socket. With `reason` (an interrupted run, whose processes are already
        killed) a step that connects from now on fails at once with it instead of waiting for the server."""
        if self.proc is None:
            return
        import shutil
        import subprocess

        if reason is not None:
            Path(self.sock + ".failed").write_text(reason)
            Path(self.sock).unlink(missing_ok=True)
        os.environ.pop(SERVER_ENV, None)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if reason is None:
            shutil.rmtree(self.sock_dir, ignore_errors=True)


def _connect(path: str, timeout_s: float = 300.0) -> socket.socket:
    """Connect to the server, waiting while it warms up (its socket appears once it listens)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            failed = Path(path + ".failed")
            if failed.is_file():
                raise StepFailed(f"the kdflow step server failed to start: {failed.read_text()}") from None
            if time.monotonic() > deadline:
                raise StepFailed(f"no kdflow step server answered at {path} within {timeout_s:.0f} s") from None
            time.sleep(0.05)


def run_step(fn: Callable, **kwargs):
    """Call the entry point `fn` (a function of `kdflow.runner.entrypoints`) with `kwargs`: in a forked child of
    the step server when one is announced in the environment, else right here."""
    if fn.__module__ != ENTRYPOINTS:
        raise ValueError(f"run_step runs the functions of {ENTRYPOINTS}, not {fn.__module__}.{fn.__qualname__}")
    path = os.environ.get(SERVER_ENV)
    if not path or path == "off":
        return fn(**kwargs)
    sys.stdout.flush()
    sys.stderr.flush()
    with _connect(path) as conn:
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV) and k != SERVER_ENV}
        request = json.dumps({"name": fn.__name__, "kwargs": kwargs, "cwd": os.getcwd(), "env": env}).encode()
        socket.send_fds(conn, [request + b"\n"], [sys.stdout.fileno(), sys.stderr.fileno()])
        reply = _read_line(conn)
    if reply is None:
        raise StepFailed(f"step {fn.__name__}: the step server's child died without a reply (killed?)")
    if "error" in reply:
        raise StepFailed(f"step {fn.__name__} failed: {reply['error']}")
    return reply["result"]


def _read_line(conn: socket.socket) -> dict | None:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    return json.loads(buf)


def _warm_up() -> None:
    """Import what the steps import, so each forked child starts with it loaded (no torch ops, no threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (evaluate's confusion figure)
    import mlflow
    import mlflow.onnx  # noqa: F401  (and onnx, onnxscript: the ONNX export; not onnxruntime, which starts a thread)
    import mlflow.pyfunc  # noqa: F401  (this and torch's export/serde modules: what a first pt2 log loads)
    import mlflow.pytorch  # noqa: F401
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import onnx  # noqa: F401
    import onnxscript  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import torch._dynamo  # noqa: F401  (imported by every optimizer and the FLOP counter)
    import torch._export.serde.serialize  # noqa: F401
    import torch._functorch.aot_autograd  # noqa: F401
    import torch.export  # noqa: F401
    import torch.export._trace  # noqa: F401  (what export() itself loads on first use)
    import torch.onnx._internal.exporter._core  # noqa: F401  (the dynamo exporter)
    import torch_pruning  # noqa: F401

    import kdflow.models.pruning  # noqa: F401
    import kdflow.runner.entrypoints  # noqa: F401
    import kdflow.steps.data_prep  # noqa: F401
    import kdflow.steps.distill  # noqa: F401  (and through it the engine, the teacher step and the context)
    import kdflow.steps.evaluate  # noqa: F401
    import kdflow.steps.finalize  # noqa: F401
    import kdflow.steps.prune  # noqa: F401
    import kdflow.steps.register  # noqa: F401

    # what MLflow's start_run imports on the side: IPython (its Databricks probe looks for a notebook shell,
    # 0.2 s in every step otherwise) and GitPython (the run's source-version tag). Both optional.
    for optional in ("IPython", "git"):
        try:
            importlib.import_module(optional)
        except ImportError:
            pass

    # MLflow's map of installed packages, which its model logging builds by scanning every installed
    # distribution (over a second). A private helper, so only tried: without it each step builds the map.
    try:
        from mlflow.utils.requirements_utils import _init_modules_to_packages_map

        _init_modules_to_packages_map()
    except (ImportError, AttributeError):  # pragma: no cover - another MLflow version
        pass
    del mlflow


def _child(conn: socket.socket, fds: list[int], request: dict) -> None:
    """In the forked child: the step's stdout/stderr become ours, run the call, reply, exit without teardown."""
    code = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the step may wait for its own subprocesses (torchrun)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        os.chdir(request["cwd"])
        for k in [k for k in os.environ if k.startswith(FORWARDED_ENV)]:  # the step's, not the server's
            del os.environ[k]
        os.environ.update(request.get("env", {}))
        entrypoint = getattr(importlib.import_module(ENTRYPOINTS), request["name"])
        result = entrypoint(**request["kwargs"])
        reply = {"result": result}
    except BaseException as err:  # reported to the step's process, which fails with it
        traceback.print_exc()
        reply = {"error": f"{type(err).__name__}: {err}"}
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
    finally:
        os._exit(code)


def serve(path: str) -> None:
    """Listen on `path` until SIGTERM; fork one child per request."""
    try:
        _warm_up()
    except BaseException as err:  # waiting clients read this instead of timing out
        Path(path + ".failed").write_text(f"{type(err).__name__}: {err}")
        raise
    signal.signal(signal.SIGTERM, lambda *_: _exit_now(path))
    # Ctrl-C reaches every process of the terminal's foreground group: the local run that started this server
    # stops it and its steps itself (`kdflow.pipelines.local.Interrupt`), so neither dies half-way on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(16)
    os.replace(path + ".tmp", path)  # clients waiting for the path find a listening socket
    print(READY, file=sys.stderr, flush=True)
    try:
        while True:
            try:
                conn, _ = server.accept()
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
            while not msg.endswith(b"\n"):
                more = conn.recv(1 << 20)
                if not more:
                    break
                msg += more
            if os.fork() == 0:
                server.close()
                _child(conn, fds, json.loads(msg))
            conn.close()
            for fd in fds:
                os.close(fd)
    finally:
        server.close()
        Path(path).unlink(missing_ok=True)


def _exit_now(path: str) -> None:
    """SIGTERM: remove the socket and exit. The server holds no other state, so it skips the interpreter's
    teardown (seconds with torch and MLflow loaded)."""
    Path(path).unlink(missing_ok=True)
    sys.stderr.flush()
    os._exit(0)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    serve(sys.argv[1])
