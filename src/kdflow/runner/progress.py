"""The local run's console: what a `kdflow run` shows while kfp.local runs the steps.

The steps print machine-readable progress events into their logs (`kdflow.tracking.PROGRESS_EVENT`, one JSON
object a line: a training phase's start, every epoch with its time, its end) and kfp.local prints a line when a
task starts and ends. `RunProgress` reads those lines into the run's state: the pipeline's step k/n, and per
training phase its epoch k/n, elapsed time and ETA from the measured epoch times. Two views show it:
`PlainView` (not a terminal: CI, pipes, tests) as concise lines, `LiveView` (a terminal) as rich progress bars.

The ETA of a phase is its seconds per epoch (measured between the epochs seen, so the first epoch's set-up time
does not count) times the epochs left to its maximum: with early stopping it is an upper bound, wrong by at
most the epochs it did not need.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from kdflow.tracking import PROGRESS_EVENT, PROGRESS_PREFIX

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_START = re.compile(r"Executing task '([^']+)'")
TASK_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
PIPELINE_END = re.compile(r"Pipeline '([^']+)' finished with status (\w+)")
NOTE_EVERY_S = 30.0  # a plain view prints a phase's epoch at least this often (and at every fifth of its epochs)


def pipeline_steps(distill_steps: int) -> int:
    """Tasks in one local run: data prep, teacher, prune, a distill and an evaluate per candidate group,
    register and the exit handler's finalize."""
    return 5 + 2 * distill_steps


def clock_text(seconds: float) -> str:
    """0:01:05 for 65.4 s."""
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


@dataclass
class Phase:
    """One training phase (a teacher phase, a candidate, a search variant): `of` epochs at most."""

    name: str
    of: int
    start: float  # the step's clock when the phase began (its start event)
    epoch: int = 0
    first: tuple[int, float] | None = None  # the first epoch seen, and when it ended
    last_time: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    done: bool = False
    noted_at: float = 0.0  # when a plain view last printed an epoch of it

    def elapsed(self) -> float:
        return (self.last_time if self.epoch else self.start) - self.start

    def seconds_per_epoch(self) -> float | None:
        if self.first is None:
            return None
        e0, t0 = self.first
        if self.epoch > e0:
            return (self.last_time - t0) / (self.epoch - e0)
        return t0 - self.start  # one epoch seen: its own time, set-up included

    def eta(self) -> float | None:
        """Seconds to the last of `of` epochs at the measured pace; None before the first epoch."""
        per = self.seconds_per_epoch()
        return None if per is None else per * max(0, self.of - self.epoch)


@dataclass
class Note:
    """A line a view prints for good: kind is "step", "epoch", "phase" (a phase ended early), "finished" (a phase
    ran all its epochs: a plain view's last epoch line said so already) or "message"."""

    kind: str
    text: str


class RunProgress:
    """The state of one local run, fed line by line (`feed`), each line returning the notes it makes."""

    def __init__(self, steps: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.steps, self.clock, self.t0 = steps, clock, clock()
        self.started = self.finished = 0
        self.running: dict[str, list[tuple[int, float]]] = {}  # task name → (its step number, start) per instance
        self.phases: dict[str, Phase] = {}

    def _stamp(self, text: str) -> str:
        return f"[{clock_text(self.clock() - self.t0)}] {text}"

    def _of(self, k: int) -> str:
        return f"{k}/{self.steps}" if self.steps else str(k)

    def feed(self, line: str) -> list[Note]:
        line = ANSI.sub("", line).strip()
        if line.startswith(PROGRESS_EVENT):
            try:
                event = json.loads(line[len(PROGRESS_EVENT) :])
                return self._event(event)
            except (ValueError, KeyError, TypeError):
                return []  # a line cut or garbled in the log: the next one carries the state again
        if m := TASK_START.search(line):
            self.started += 1
            self.running.setdefault(m.group(1), []).append((self.started, self.clock()))
            return [Note("step", self._stamp(f"step {self._of(self.started)} {m.group(1)} started"))]
        if m := TASK_END.search(line):
            name, status = m.groups()
            self.finished += 1
            k, began = (self.running.get(name) or [(self.finished, self.t0)]).pop(0)
            took = clock_text(self.clock() - began)
            done = self._of(self.finished)
            return [Note("step", self._stamp(f"step {self._of(k)} {name} {status} in {took} ({done} done)"))]
        if m := PIPELINE_END.search(line):
            took = clock_text(self.clock() - self.t0)
            return [Note("step", self._stamp(f"pipeline {m.group(1)} {m.group(2)} in {took}"))]
        if PROGRESS_PREFIX in line:
            return [Note("message", line[line.index(PROGRESS_PREFIX) :])]
        return []

    def _event(self, ev: dict) -> list[Note]:
        name, epoch, of, t = str(ev["phase"]), int(ev["epoch"]), int(ev["of"]), float(ev["time"])
        phase = self.phases.get(name)
        if phase is None or (epoch == 0 and not ev.get("done")):  # a start event (again: a retried step)
            phase = self.phases[name] = Phase(name, of, start=t, noted_at=t)
            if epoch == 0:
                return []
        if ev.get("done"):
            return self._ended(phase)
        phase.epoch, phase.last_time = epoch, t
        phase.metrics = {k: float(v) for k, v in ev.items() if k in ("loss", "val_acc")}
        if phase.first is None:
            phase.first = (epoch, t)
        due = epoch >= of or epoch % max(1, of // 5) == 0 or t - phase.noted_at >= NOTE_EVERY_S
        if not due:
            return []
        phase.noted_at = t
        return [Note("epoch", self._stamp(self.epoch_text(phase)))]

    def _ended(self, p: Phase) -> list[Note]:
        p.done = True
        took = clock_text(p.elapsed())
        if p.epoch == 0:
            return []
        if p.epoch < p.of:
            return [Note("phase", self._stamp(f"{p.name} ended at epoch {p.epoch}/{p.of} after {took}"))]
        shown = "".join(f", {k} {v:.4f}" for k, v in p.metrics.items())
        epochs = f"{p.of} epoch{'s' * (p.of != 1)}"
        return [Note("finished", self._stamp(f"{p.name} done: {epochs} in {took}{shown}"))]

    @staticmethod
    def epoch_text(p: Phase) -> str:
        shown = "".join(f" {k} {v:.4f}" for k, v in p.metrics.items())
        eta = p.eta()
        return (
            f"{p.name} epoch {p.epoch}/{p.of}{shown} ({clock_text(p.elapsed())} elapsed, "
            f"ETA {clock_text(eta) if eta is not None else '?'})"
        )


class _Lines:
    """Whole lines out of writes that may cut them (print writes a line and its end apart)."""

    def __init__(self):
        self.rest = ""

    def split(self, text: str) -> list[str]:
        *whole, self.rest = (self.rest + text).split("\n")
        return whole

    def drain(self) -> list[str]:
        rest, self.rest = self.rest, ""
        return [rest] if rest.strip() else []


class PlainView:
    """Concise lines, one per note: for a console that is not a terminal."""

    def __init__(self, stream: IO[str], state: RunProgress):
        self.stream, self.state, self.lines = stream, state, _Lines()

    def write(self, text: str) -> None:
        for line in self.lines.split(text):
            self._show(self.state.feed(line))

    def _show(self, notes: list[Note]) -> None:
        notes = [n for n in notes if n.kind != "finished"]
        for note in notes:
            self.stream.write(note.text + "\n")
        if notes:
            self.stream.flush()

    def close(self) -> None:
        for line in self.lines.drain():
            self._show(self.state.feed(line))


class LiveView(PlainView):
    """rich progress bars for a terminal: the pipeline's steps and every phase training now (epoch k/n, elapsed,
    ETA); steps and phases that end are printed above the bars for good."""

    def __init__(self, stream: IO[str], state: RunProgress):
        super().__init__(stream, state)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[unit]} {task.completed:.0f}/{task.total:.0f}"),
            TimeElapsedColumn(),
            EtaColumn(),
            console=Console(file=stream),
            transient=True,  # the bars go when the run ends; the notes above them stay
            redirect_stdout=False,  # stdout is the run log's already (kfp.local's output)
            redirect_stderr=False,
        )
        steps = state.steps or 0
        self.pipeline = self.progress.add_task("pipeline", total=steps, unit="step", eta=False)  # (no ETA)
        self.bars: dict[str, int] = {}
        self.progress.start()

    def _show(self, notes: list[Note]) -> None:
        for note in notes:
            if note.kind != "epoch":  # the bars show the epochs
                self.progress.console.print(note.text, markup=False, highlight=False, soft_wrap=True)
        self._sync()

    def _sync(self) -> None:
        s, now = self.state, time.monotonic()
        names = ", ".join(n for n, runs in s.running.items() if runs)
        self.progress.update(
            self.pipeline, completed=s.finished, description=f"pipeline ({names})" if names else "pipeline"
        )
        for name, phase in s.phases.items():
            bar = self.bars.get(name)
            if phase.done:
                if bar is not None:
                    self.progress.remove_task(bar)
                    del self.bars[name]
                continue
            if bar is None:
                bar = self.bars[name] = self.progress.add_task(name, total=phase.of, unit="epoch", eta=None, eta_at=now)
            self.progress.update(bar, completed=phase.epoch, eta=phase.eta(), eta_at=now)

    def close(self) -> None:
        super().close()
        self.progress.stop()


class EtaColumn(ProgressColumn):
    """ETA from the run's measured epoch times (the task's `eta` field at `eta_at`), counting down between events."""

    def render(self, task) -> Text:
        eta = task.fields.get("eta")
        if eta is False:
            return Text("")
        if eta is None:
            return Text("ETA -:--:--", style="progress.remaining")
        left = eta - (time.monotonic() - task.fields.get("eta_at", 0.0))
        return Text(f"ETA {clock_text(left)}", style="progress.remaining")


def view_for(stream: IO[str], steps: int | None, live: bool | None = None):
    """The view a console gets: bars on a terminal, plain lines elsewhere."""
    state = RunProgress(steps)
    isatty = getattr(stream, "isatty", lambda: False)
    return LiveView(stream, state) if (isatty() if live is None else live) else PlainView(stream, state)


class HeldBack(io.TextIOBase):
    """MLflow's log stream while a local run starts: the store's set-up lines are held back until the run log
    opens (`attach`), then written there, so they stay out of the console."""

    def __init__(self):
        self.held: list[str] = []
        self.target: IO[str] | None = None
        self.lock = threading.Lock()
        self.on_attach: Callable[[], None] | None = None  # `setting_up`'s end

    def write(self, text: str) -> int:
        with self.lock:
            if self.target is not None and not self.target.closed:
                self.target.write(text)
            else:
                self.held.append(text)
        return len(text)

    def attach(self, target: IO[str]) -> None:
        """The run log is open: what was held goes there, and so does what follows."""
        with self.lock:
            target.write("".join(self.held))
            self.held.clear()
            self.target = target
            done, self.on_attach = self.on_attach, None
        if done is not None:
            done()

    def detach(self) -> None:
        with self.lock:
            self.target = None

    def take(self) -> str:
        with self.lock:
            text, self.held = "".join(self.held), []
            return text


HELD = HeldBack()  # what `ProgressLog` attaches its file to
MLFLOW_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey")  # those MLflow gives a stream handler


@contextlib.contextmanager
def mlflow_logs_to_run_log(fallback: IO[str] | None = None):
    """For a local run: MLflow's own log lines in this process (creating and migrating the SQLite store, before
    any step runs) go to the run log instead of the console. Lines from before the log opened that no log took
    (a run that failed before it started) go to `fallback` (stderr) at the end."""
    import mlflow  # noqa: F401 - configures the loggers whose streams are swapped here

    swapped: dict[int, tuple[logging.StreamHandler, IO]] = {}
    for name in MLFLOW_LOGGERS:
        for h in logging.getLogger(name).handlers:
            if type(h) is logging.StreamHandler and id(h) not in swapped:
                swapped[id(h)] = (h, h.setStream(HELD))
    try:
        yield HELD
    finally:
        for h, old in swapped.values():
            h.setStream(old)
        HELD.detach()
        if left := HELD.take():
            (fallback or sys.stderr).write(left)


SETTING_UP = "setting up the MLflow store, the step server and kfp.local"


@contextlib.contextmanager
def setting_up(console: Console):
    """Before the run log opens (creating or migrating the store, warming the step server, importing kfp; tens of
    seconds on a busy machine): a spinner with the elapsed time on a terminal, one line elsewhere. It ends when
    the run log opens (`ProgressLog` attaches to `HELD`) or when the block does."""
    if not console.is_terminal:
        console.print(f"{SETTING_UP} …", highlight=False)
        yield None
        return
    spinner = Progress(
        SpinnerColumn(), TextColumn(SETTING_UP), TimeElapsedColumn(),
        console=console, transient=True, redirect_stdout=False, redirect_stderr=False,
    )  # fmt: skip
    spinner.add_task("setup", total=None)
    spinner.start()
    HELD.on_attach = spinner.stop
    try:
        yield spinner
    finally:
        HELD.on_attach = None
        spinner.stop()
