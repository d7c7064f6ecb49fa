"""The local run's console (`kdflow.runner.progress`): kfp.local's task lines and the steps' progress events in,
step k/n, epoch k/n, elapsed and ETA out; MLflow's set-up lines kept in the run log."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from kdflow.pipelines.local import ProgressLog
from kdflow.runner import progress
from kdflow.runner.progress import EtaColumn, LiveView, PlainView, RunProgress, clock_text
from kdflow.tracking import PROGRESS_EVENT, PROGRESS_PREFIX


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def event(phase: str, epoch: int, of: int, t: float, **extra) -> str:
    """An event line as a step prints it (tracking.progress_event) and kfp.local indents it."""
    payload = json.dumps({"phase": phase, "epoch": epoch, "of": of, "time": t, **extra})
    return f"        \x1b[0m{PROGRESS_EVENT} {payload}"


def texts(notes) -> list[str]:
    return [n.text for n in notes]


def test_clock_text():
    assert [clock_text(s) for s in (0, 59.4, 65.5, 3725, -3)] == ["0:00:00", "0:00:59", "0:01:06", "1:02:05", "0:00:00"]


def test_steps_are_counted_k_of_n_with_their_times():
    clock = Clock(100.0)
    run = RunProgress(steps=9, clock=clock)
    clock.now = 101.0
    assert texts(run.feed("21:51:50.594 - INFO - Executing task \x1b[96m'data-prep'\x1b[0m")) == [
        "[0:00:01] step 1/9 data-prep started"
    ]
    clock.now = 104.2
    assert texts(run.feed("21:51:53.287 - INFO - Task \x1b[96m'data-prep'\x1b[0m finished with status SUCCESS")) == [
        "[0:00:04] step 1/9 data-prep SUCCESS in 0:00:03 (1/9 done)"
    ]
    clock.now = 110.0
    assert texts(run.feed("Executing task 'distill'") + run.feed("Executing task 'distill'")) == [
        "[0:00:10] step 2/9 distill started",
        "[0:00:10] step 3/9 distill started",
    ]
    clock.now = 130.0  # two iterations of one loop share a name: the first to start is taken to end first
    assert texts(run.feed("    Task 'distill' finished with status FAILURE")) == [
        "[0:00:30] step 2/9 distill FAILURE in 0:00:20 (2/9 done)"
    ]
    assert run.running == {"data-prep": [], "distill": [(3, 110.0)]}
    assert texts(run.feed("Pipeline 'kdflow' finished with status FAILURE. Inner task failed: 'distill'.")) == [
        "[0:00:30] pipeline kdflow FAILURE in 0:00:30"
    ]


def test_epochs_give_elapsed_and_an_eta_from_the_measured_epoch_times():
    """Epoch 1 takes 10 s (set-up), every later one 3 s: the pace is measured from epoch 1's end on, and the ETA
    is that pace times the epochs left to the maximum (20)."""
    clock = Clock(100.0)
    run = RunProgress(steps=9, clock=clock)
    times = {e: 1010.0 + 3 * (e - 1) for e in range(1, 21)}
    assert run.feed(event("teacher pretrain", 0, 20, 1000.0)) == []
    assert run.feed(event("teacher pretrain", 1, 20, times[1], loss=2.3, val_acc=0.1)) == []
    phase = run.phases["teacher pretrain"]
    assert (phase.epoch, phase.elapsed(), phase.seconds_per_epoch(), phase.eta()) == (1, 10.0, 10.0, 190.0)
    notes = []
    clock.now = 106.0
    for e in range(2, 9):
        notes += run.feed(event("teacher pretrain", e, 20, times[e], loss=round(1 / e, 4), val_acc=0.5 + e / 100))
    assert texts(notes) == [  # every fifth of the epochs (4, 8, ...) and the last
        "[0:00:06] teacher pretrain epoch 4/20 loss 0.2500 val_acc 0.5400 (0:00:19 elapsed, ETA 0:00:48)",
        "[0:00:06] teacher pretrain epoch 8/20 loss 0.1250 val_acc 0.5800 (0:00:31 elapsed, ETA 0:00:36)",
    ]
    assert (phase.seconds_per_epoch(), phase.eta()) == (3.0, 36.0)


def test_an_early_stop_ends_the_phase_within_the_eta_it_showed():
    clock = Clock(0.0)
    run = RunProgress(clock=clock)
    run.feed(event("teacher finetune", 0, 60, 0.0))
    etas = []
    for e in range(1, 13):
        run.feed(event("teacher finetune", e, 60, 2.0 * e, val_acc=0.9))
        etas.append(run.phases["teacher finetune"].eta())
    assert etas[-1] == 2.0 * 48  # the bound: the remaining maximum epochs at the measured pace
    clock.now = 30.0
    assert texts(run.feed(event("teacher finetune", 12, 60, 24.0, done=True))) == [
        "[0:00:30] teacher finetune ended at epoch 12/60 after 0:00:24"
    ]
    assert run.phases["teacher finetune"].done
    # a phase that ran all its epochs just ends: its last epoch line said so
    run.feed(event("p", 0, 2, 0.0))
    run.feed(event("p", 1, 2, 1.0))
    assert texts(run.feed(event("p", 2, 2, 2.0, val_acc=0.5))) == [
        "[0:00:30] p epoch 2/2 val_acc 0.5000 (0:00:02 elapsed, ETA 0:00:00)"
    ]
    (note,) = run.feed(event("p", 2, 2, 2.0, done=True))  # for a terminal's view, whose bar goes
    assert (note.kind, note.text) == ("finished", "[0:00:30] p done: 2 epochs in 0:00:02, val_acc 0.5000")


def test_long_epochs_are_shown_at_least_every_30_seconds():
    run = RunProgress(clock=Clock(0.0))
    run.feed(event("distill big-kd", 0, 100, 0.0))
    shown = [e for e in range(1, 21) if run.feed(event("distill big-kd", e, 100, 7.0 * e))]
    assert shown == [5, 10, 15, 20]  # 35 s apart; 20 is also a fifth of 100


def test_messages_pass_and_noise_and_garbled_events_do_not():
    run = RunProgress(clock=Clock())
    assert texts(run.feed(f"    \x1b[32m{PROGRESS_PREFIX} teacher fine-tuning was still improving\x1b[0m")) == [
        f"{PROGRESS_PREFIX} teacher fine-tuning was still improving"
    ]
    assert run.feed("    [KFP Executor 2026-11-25 21:51:53,329 INFO]: Looking for component") == []
    assert run.feed("    [kdflow-timing] step=data-prep compute_s=0.032 wall_s=0.033") == []
    assert run.feed(f'{PROGRESS_EVENT} {{"phase": "x", "epo') == []  # cut: ignored, the next event carries on
    assert run.feed(f'{PROGRESS_EVENT} {{"phase": "x"}}') == []
    assert run.phases == {}


def test_plain_view_joins_lines_cut_across_writes():
    out = io.StringIO()
    view = PlainView(out, RunProgress(steps=7, clock=Clock(0.0)))
    view.write("Executing task 'pr")
    assert out.getvalue() == ""
    view.write("une'\n    [KFP Executor] noise\n")
    for line in (event("p", 0, 1, 0.0), event("p", 1, 1, 1.0), event("p", 1, 1, 1.0, done=True)):
        view.write(line + "\n")  # a phase that ran all its epochs: its last epoch line is its end
    view.write(f"{PROGRESS_PREFIX} last words")
    view.close()
    assert out.getvalue().splitlines() == [
        "[0:00:00] step 1/7 prune started",
        "[0:00:00] p epoch 1/1 (0:00:01 elapsed, ETA 0:00:00)",
        f"{PROGRESS_PREFIX} last words",
    ]


def test_live_view_keeps_a_bar_per_training_phase_and_prints_steps_above():
    out = io.StringIO()
    clock = Clock(0.0)
    view = LiveView(out, RunProgress(steps=9, clock=clock))
    try:
        view.write("Executing task 'train-teacher'\n")
        view.write(event("teacher pretrain", 0, 20, 0.0) + "\n")
        for e in range(1, 5):
            view.write(event("teacher pretrain", e, 20, 2.0 * e, val_acc=0.5) + "\n")
        bars = {t.description: t for t in view.progress.tasks}
        assert set(bars) == {"pipeline (train-teacher)", "teacher pretrain"}
        bar = bars["teacher pretrain"]
        assert (bar.completed, bar.total, bar.fields["unit"], bar.fields["eta"]) == (4, 20, "epoch", 32.0)
        assert (bars["pipeline (train-teacher)"].completed, bars["pipeline (train-teacher)"].total) == (0, 9)
        view.write(event("teacher pretrain", 4, 20, 8.0, done=True) + "\n")
        view.write(event("distill s-kd", 0, 1, 8.0) + "\n" + event("distill s-kd", 1, 1, 9.5, val_acc=0.75) + "\n")
        view.write(event("distill s-kd", 1, 1, 9.5, done=True) + "\n")
        view.write("Task 'train-teacher' finished with status SUCCESS\n")
        assert [(t.description, t.completed) for t in view.progress.tasks] == [("pipeline", 1)]
    finally:
        view.close()
    printed = out.getvalue()
    assert "[0:00:00] step 1/9 train-teacher started" in printed
    assert "teacher pretrain ended at epoch 4/20 after 0:00:08" in printed
    assert "distill s-kd done: 1 epoch in 0:00:02, val_acc 0.7500" in printed
    assert "epoch 4/20 loss" not in printed  # epochs are the bars' business


def test_eta_column_counts_down_between_events():
    class Task:
        fields = {"eta": 48.0, "eta_at": time.monotonic() - 8.0}

    assert EtaColumn().render(Task()).plain == "ETA 0:00:40"
    Task.fields = {"eta": None}
    assert EtaColumn().render(Task()).plain == "ETA -:--:--"
    Task.fields = {"eta": False}  # the pipeline's bar
    assert EtaColumn().render(Task()).plain == ""


def test_progress_log_prints_its_path_and_keeps_everything_in_the_file(tmp_path):
    console = io.StringIO()
    log = ProgressLog(tmp_path / "run.log", console, steps=9, live=False)
    text = (
        "21:51:50.594 - INFO - Executing task \x1b[96m'data-prep'\x1b[0m\n"
        "    [KFP Executor 2026-11-25 21:51:53,329 INFO]: Looking for component\n"
        f"    \x1b[32m{PROGRESS_PREFIX} the teacher is weak\x1b[0m\n"
    )
    assert log.write(text) == len(text)
    log.close()
    lines = console.getvalue().splitlines()
    assert lines[0] == f"run log: {tmp_path / 'run.log'}"
    assert lines[1].endswith("] step 1/9 data-prep started") and lines[2:] == [f"{PROGRESS_PREFIX} the teacher is weak"]
    assert (tmp_path / "run.log").read_text() == text  # the log keeps everything, colours included


def test_progress_log_verbose_shows_everything(tmp_path):
    console = io.StringIO()
    log = ProgressLog(tmp_path / "run.log", console, verbose=True)
    log.write("noise\n")
    assert log.tail() == "noise\n"  # what a failure message quotes
    log.close()
    assert console.getvalue() == f"run log: {tmp_path / 'run.log'}\nnoise\n"


def test_setting_up_is_shown_until_the_run_log_opens(tmp_path):
    from rich.console import Console

    plain = Console(file=io.StringIO(), width=120)
    with progress.setting_up(plain) as spinner:
        assert spinner is None
    assert plain.file.getvalue() == "setting up the MLflow store, the step server and kfp.local …\n"
    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    with progress.setting_up(terminal) as spinner:
        assert spinner.live.is_started and progress.HELD.on_attach == spinner.stop
        log = ProgressLog(tmp_path / "run.log", io.StringIO(), live=False)
        assert not spinner.live.is_started and progress.HELD.on_attach is None  # gone before "run log: ..."
        log.close()


@pytest.fixture
def mlflow_stream():
    import mlflow  # noqa: F401 - its loggers get their handler on import

    (handler,) = logging.getLogger("mlflow").handlers
    return handler


def test_mlflows_setup_lines_go_to_the_run_log_not_the_console(tmp_path, mlflow_stream):
    before = mlflow_stream.stream
    console = io.StringIO()
    with progress.mlflow_logs_to_run_log(fallback=console):
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        assert mlflow_stream.stream is progress.HELD
        log = ProgressLog(tmp_path / "run.log", console, live=False)
        logging.getLogger("mlflow.store.db.utils").info("Updating database tables")
        log.write("Executing task 'data-prep'\n")
        log.close()
    assert mlflow_stream.stream is before  # restored
    kept = (tmp_path / "run.log").read_text()
    assert "Creating initial MLflow database tables..." in kept and "Updating database tables" in kept
    assert "database" not in console.getvalue()


def test_setup_lines_no_run_log_took_are_not_lost(mlflow_stream):
    fallback = io.StringIO()
    with progress.mlflow_logs_to_run_log(fallback=fallback):
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    assert "Creating initial MLflow database tables..." in fallback.getvalue()
    assert progress.HELD.take() == ""
