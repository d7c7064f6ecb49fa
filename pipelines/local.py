"""Run the same pipeline on this machine with kfp.local: every step a subprocess, MLflow in a SQLite file."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO

from kdflow import secrets, tracking
from kdflow.config import Config, first_difference
from kdflow.runner import progress, stepserver
from kdflow.runtime import cpus, filelock, procs

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
        self.file = path.open("w", buffering=1)  # line-buffered: an interrupted run's log ends where it stopped
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


def run_local(
    cfg: Config, home: Path, tracking_uri: str | None = None, verbose: bool = False, resume: bool = False
) -> dict:
    """Run the pipeline locally; return the registration step's summary (decision, teacher, candidates).

    The full step logs go to <home>/logs/; the console shows progress only (all of it with `verbose`).
    SIGINT (Ctrl-C) or SIGTERM stops the run at once (`Interrupt`). With `resume`, the run continues the last
    run on `home` that did not succeed (`plan_resume`): its finished steps are reused and an interrupted
    training step continues from its epoch checkpoint."""
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
        stepserver.StepServer(home / "logs" / "step-server.log") as server,  # warms up meanwhile
    ):
        active = home / ACTIVE_FILE
        tracking.ensure_experiment(cfg.experiment, uri)  # creates the SQLite store once, before steps race for it
        close_dead_run(active)  # we hold the lock: a run that left its record behind was killed
        plan = plan_resume(home, cfg) if resume else None
        record = {"local_run": run_id, "pid": os.getpid(), "experiment": cfg.experiment, "tracking_uri": uri}
        active.write_text(json.dumps(record))
        earlier = sorted(d.name for d in (home / "pipeline-root").glob("*/"))  # so the next resume finds ours
        config = cfg.model_dump(mode="json")  # recorded without its credentials, if any: --resume asks for them
        scrubbed = secrets.scrub(config)
        last = LastRun(home, {**record, "config": scrubbed, "status": "running", "resumes": plan,
                              "credentials": scrubbed != config, "earlier_dirs": earlier})  # fmt: skip
        try:
            with _env(tracking.RESUME_ENV, json.dumps(plan)) if plan else contextlib.nullcontext():
                with Interrupt(server, cfg.experiment, run_id, last, home, uri):
                    summary = _run(cfg, home, uri, verbose)
        except BaseException:
            last.update(status="failed")
            raise
        finally:
            active.unlink(missing_ok=True)
        last.update(status="succeeded")
        return summary


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
        # in the store that run used (another --tracking-uri than this run's, maybe)
        closed = tracking.close_orphans(dead["experiment"], dead["local_run"], reason, uri=dead.get("tracking_uri"))
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


LAST_FILE = ".kdflow-last-run.json"  # the latest local run on a home and how it ended: what --resume continues


class ResumeError(ValueError):
    """`--resume` has nothing to continue, or would continue it with another config."""


class LastRun:
    """The record of the latest local run on a home (`LAST_FILE`): its id, experiment, config and status."""

    def __init__(self, home: Path, record: dict):
        self.path, self.record = home / LAST_FILE, record
        self._write()

    def update(self, **fields) -> None:
        self.record.update(fields)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path)

    @staticmethod
    def read(home: Path) -> dict | None:
        path = home / LAST_FILE
        return json.loads(path.read_text()) if path.is_file() else None


def recorded_config(home: Path) -> Config | None:
    """The config of the latest local run on `home` (what `kdflow run --resume` continues with), if recorded."""
    last = LastRun.read(home)
    if last and last.get("credentials"):
        raise ResumeError(
            "--resume: the interrupted run's config held credentials, which are not recorded: "
            "pass the same -c/--set again"
        )
    return Config.model_validate(last["config"]) if last else None


def plan_resume(home: Path, cfg: Config) -> dict:
    """What a resumed run continues: the KFP run id and name of the last run on `home` that did not succeed
    (failed, interrupted or killed), and its folder under the local pipeline root. The steps read it from the
    environment (`tracking.RESUME_ENV`). Refused when there is no such run or `cfg` is not its config."""
    last = LastRun.read(home)
    if last is None:
        raise ResumeError(f"--resume: no earlier kdflow run on {home} to continue")
    if last["status"] == "succeeded":
        raise ResumeError(f"--resume: the last kdflow run on {home} finished; there is nothing to continue")
    scrubbed = secrets.scrub(cfg.model_dump(mode="json"))
    if scrubbed != last["config"]:
        key = first_difference(scrubbed, last["config"])
        raise ResumeError(f"--resume: {key} differs from the interrupted run's config; resume it without -c/--set")
    parent = tracking.find_local_parent(last["experiment"], last["local_run"])
    if parent is None and last.get("resumes"):  # a resumed run stopped before it took over the parent run
        parent = last["resumes"]["pipeline_run_id"], last["resumes"]["run_name"]
    if parent is None:  # it stopped before its first step opened the pipeline's MLflow run
        raise ResumeError(f"--resume: the last kdflow run on {home} stopped before its first training step")
    pipeline_run_id, run_name = parent
    run_dir = _last_run_dir(home, last, run_name)
    if not run_dir.is_dir():
        raise ResumeError(f"--resume: the interrupted run's folder {run_dir} is gone")
    print(f"{tracking.PROGRESS_PREFIX} resuming the interrupted run {run_name}", flush=True)
    root = str(home / "pipeline-root")
    return {"pipeline_run_id": pipeline_run_id, "run_name": run_name, "run_dir": str(run_dir), "root": root}


def _last_run_dir(home: Path, last: dict, run_name: str) -> Path:
    """The folder the last run's steps wrote to under the local pipeline root: the one that appeared after it
    started; else (it stopped before kfp.local made one) what it resumed, or the folder named after the run."""
    root = home / "pipeline-root"
    new = sorted({d.name for d in root.glob("*/")} - set(last.get("earlier_dirs", [])))
    if new:
        return root / new[-1]
    if last.get("resumes"):
        return Path(last["resumes"]["run_dir"])
    return root / run_name


class Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM while a local run runs: stop it within seconds, never retrying a step.

    The handler does it all itself rather than unwinding through kfp.local (whose loop runner would wait for,
    and even start, further iterations): every process the run started is killed (the KFP executors, the step
    server and the steps it forked), the run's open MLflow runs end KILLED with the signal as the reason, the
    run's records and the step server's socket are removed, and the process exits 130 (SIGINT) or 143
    (SIGTERM); the home's lock goes with the process. `kdflow run --resume` then continues the run."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    DEADLINE_S = 8.0  # however the store answers, the process is gone by then

    def __init__(self, server: stepserver.StepServer, experiment: str, local_run: str, last: LastRun, home: Path, uri):
        self.server, self.experiment, self.local_run, self.last, self.home = server, experiment, local_run, last, home
        self.uri = uri
        self.before: dict = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.before = {s: signal.signal(s, self._stop) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.before.items():
            signal.signal(s, handler)

    def _stop(self, signum: int, _frame) -> None:
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        name = signal.Signals(signum).name
        code = 128 + signum
        watchdog = threading.Timer(self.DEADLINE_S, lambda: os._exit(code))
        watchdog.daemon = True
        watchdog.start()
        procs.kill_tree()
        self.server.close(f"the kdflow run was interrupted by {name}")  # a step started meanwhile fails at once
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # a server that does not answer must not hold us
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
        reason = f"interrupted by {name}; continue it with `kdflow run --resume --home {self.home}`"
        try:
            closed = tracking.close_orphans(self.experiment, self.local_run, reason, status="KILLED", uri=self.uri)
        except Exception as err:  # the store is unreachable: the next run on the home closes them
            closed = []
            print(f"could not mark the MLflow runs KILLED ({type(err).__name__}: {err})", file=sys.__stderr__)
        self.last.update(status="interrupted")
        (self.home / ACTIVE_FILE).unlink(missing_ok=True)
        print(
            f"\ninterrupted by {name}: stopped the run's processes, marked {len(closed)} MLflow runs KILLED; "
            f"continue it with: kdflow run --resume --home {self.home}",
            file=sys.__stderr__,
            flush=True,
        )
        procs.kill_tree()  # and any process started while this ran
        if self.server.sock_dir:
            shutil.rmtree(self.server.sock_dir, ignore_errors=True)
        sys.__stdout__.flush()
        os._exit(code)


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
    # a credential in the config reaches the steps by environment (their command lines show in `ps`)
    config, secret_env = secrets.to_env(json.loads(arguments["config_json"]))
    arguments["config_json"] = json.dumps(config)
    os.environ.update(secret_env)
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
        headline = errors[-1] if errors else progress.ANSI.sub("", str(err))
        raise PipelineFailed(f"{headline}\n--- last lines of {log.path} ---\n{tail}") from None
    finally:
        builtins.print = original_print
        log.close()
    # the decision lives inside the exit handler's scope, which KFP cannot return as a pipeline output:
    # read it from this run's folder under the local pipeline root
    (run_dir,) = set(root.iterdir()) - before
    return json.loads((run_dir / "register" / "decision").read_text())
