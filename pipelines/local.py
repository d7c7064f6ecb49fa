"""Run the same pipeline on this machine with kfp.local: every step a subprocess, MLflow in a SQLite file."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO

from kdflow import tracking
from kdflow.config import Config
from kdflow.runner import progress, stepserver
from kdflow.runtime import cpus, filelock

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^\s*((?:\w+\.)*\w*(?:Error|Exception): .*)$", re.MULTILINE)
LOCAL_PARALLELISM = 2  # kfp.local's cap on concurrent ParallelFor iterations
TELEMETRY_ENV = "MLFLOW_DISABLE_TELEMETRY"


class PipelineFailed(RuntimeError):
    """A step of the local run failed; the message carries its error and the end of the run log."""


class ProgressLog(io.TextIOBase):
    """Where kfp.local's output goes during a run: all of it to a log file (whose path it prints first), and to the
    console its progress (`kdflow.runner.progress`: steps k/n, each training phase's epoch k/n, elapsed and ETA;
    bars on a terminal, plain lines elsewhere) unless `verbose`, which shows the whole output. MLflow's own log
    lines from this process (the store's set-up) go to the file too."""

    def __init__(self, path: Path, console: IO[str], verbose: bool = False, steps: int | None = None, live=None):
        self.path, self.console, self.verbose = path, console, verbose
        self.file = path.open("w")
        self.lock = threading.Lock()  # kfp.local prints from one thread per parallel loop iteration
        progress.HELD.attach(self.file)  # (which ends the set-up spinner, if any, before the line below)
        console.write(f"run log: {path}\n")
        console.flush()
        self.view = None if verbose else progress.view_for(console, steps, live)

    def write(self, text: str) -> int:
        with self.lock:
            self.file.write(text)
            if self.view is None:
                self.console.write(text)
            else:
                self.view.write(text)
        return len(text)

    def flush(self) -> None:
        self.file.flush()
        self.console.flush()

    def close(self) -> None:
        with self.lock:
            if self.view is not None:
                self.view.close()
            progress.HELD.detach()
            self.file.close()

    def tail(self, n: int = 60) -> str:
        self.file.flush()
        return "".join(self.path.read_text().splitlines(keepends=True)[-n:])


def run_local(cfg: Config, home: Path, tracking_uri: str | None = None, verbose: bool = False) -> dict:
    """Run the pipeline locally; return the registration step's summary (decision, teacher, candidates).

    The full step logs go to <home>/logs/; the console shows progress only (all of it with `verbose`)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    uri = tracking_uri or tracking.embedded_tracking_uri(home)
    # MLflow's usage telemetry fetches its config and posts events over the internet, and waits up to a second
    # at each process exit for that: off for the local run's processes unless the user set it themselves
    os.environ.setdefault(TELEMETRY_ENV, "true")
    # kfp.local runs up to two loop iterations at once: each gets its share of the cores (steps read this)
    os.environ.setdefault(cpus.PARALLEL_THREADS_ENV, str(max(1, (os.cpu_count() or 2) // LOCAL_PARALLELISM)))
    run_id = uuid.uuid4().hex
    with (
        _env(tracking.LOCAL_RUN_ENV, run_id),  # the steps tag the parent run with it
        home_lock(home),
        stepserver.StepServer(home / "logs" / "step-server.log"),  # warms up meanwhile
    ):
        active = home / ACTIVE_FILE
        tracking.ensure_experiment(cfg.experiment, uri)  # creates the SQLite store once, before steps race for it
        close_dead_run(active)  # we hold the lock: a run that left its record behind was killed
        active.write_text(json.dumps({"local_run": run_id, "pid": os.getpid(), "experiment": cfg.experiment}))
        try:
            return _run(cfg, home, uri, verbose)
        finally:
            active.unlink(missing_ok=True)


@contextlib.contextmanager
def _env(name: str, value: str):
    """`name=value` in this process's environment (which the steps inherit) for the block, then as it was."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


ACTIVE_FILE = ".kdflow-active-run.json"  # the running local run on a home; left behind only when it was killed


def close_dead_run(active: Path) -> list[str]:
    """The runs a killed `kdflow run` on this home left RUNNING (its record still there while no run holds the
    home's lock), ended FAILED with a reason naming it; the record is removed."""
    if not active.exists():
        return []
    try:
        dead = json.loads(active.read_text())
        reason = (
            f"the kdflow run (pid {dead['pid']}) that started it ended without closing it (killed?); "
            "closed by the next run on its home"
        )
        closed = tracking.close_orphans(dead["experiment"], dead["local_run"], reason)
    except (OSError, ValueError, KeyError) as err:
        print(f"{tracking.PROGRESS_PREFIX} could not read the record of an earlier run ({err}); ignored", flush=True)
        closed = []
    if closed:
        print(
            f"{tracking.PROGRESS_PREFIX} an earlier kdflow run on this home was killed: marked its {len(closed)} "
            f"unfinished MLflow runs FAILED ({', '.join(closed)})",
            flush=True,
        )
    active.unlink(missing_ok=True)
    return closed


LOCK_FILE = ".kdflow-run.lock"


def home_lock(home: Path, notice: IO[str] | None = None):
    """Hold <home>'s lock for one local run; a second `kdflow run` on the same home waits for the first.

    Two runs at once would race to create a new SQLite store (which corrupts it) and could each take the
    other's pipeline folder for their own."""

    def waiting(holder: str) -> None:
        print(f"waiting for the other kdflow run on {home} ({holder}) to finish", file=notice or sys.stderr)

    return filelock.exclusive(home / LOCK_FILE, waiting)


def _run(cfg: Config, home: Path, uri: str, verbose: bool) -> dict:
    """The pipeline itself, once the store exists and the step server (if any) is up."""
    import warnings

    from kfp import local  # kfp imports here, once the step server is already warming up

    from kdflow.pipelines.compile import pipeline_arguments
    from kdflow.pipelines.kdflow_pipeline import build_pipeline

    root = home / "pipeline-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    before = set(root.iterdir()) if root.is_dir() else set()
    # nothing preempts a local step: a failure is reported at once, never retried after a back-off (a bad input
    # would fail the same way again, and an interrupted run must not restart its steps)
    pipeline = build_pipeline(
        cfg.cluster.model_copy(update={"retry": cfg.cluster.retry.model_copy(update={"max_retries": 0})})
    )
    original_print = builtins.print  # kfp.local swaps print() to indent step logs and may not restore it
    arguments = pipeline_arguments(cfg, uri)
    steps = progress.pipeline_steps(len(arguments["candidates"]))
    log = ProgressLog(home / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log", sys.stdout, verbose, steps)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # our image is kdflow's env
            pipeline(**arguments)
    except RuntimeError as err:
        tail = log.tail()
        errors = [m.group(1) for m in EXCEPTION_LINE.finditer(tail)]
        headline = errors[-1] if errors else ANSI.sub("", str(err))
        raise PipelineFailed(f"{headline}\n--- last lines of {log.path} ---\n{tail}") from None
    finally:
        builtins.print = original_print
        log.close()
    # the decision lives inside the exit handler's scope, which KFP cannot return as a pipeline output:
    # read it from this run's folder under the local pipeline root
    (run_dir,) = set(root.iterdir()) - before
    return json.loads((run_dir / "register" / "decision").read_text())
