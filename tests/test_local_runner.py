"""The local runner's console: progress lines only, the whole of kfp.local's output in the run log."""

from __future__ import annotations

import io

from kdflow.pipelines.local import ProgressLog
from kdflow.tracking import PROGRESS_PREFIX


def test_progress_log_shows_progress_and_keeps_everything(tmp_path):
    console = io.StringIO()
    log = ProgressLog(tmp_path / "run.log", console)
    text = (
        "21:51:50.594 - INFO - Executing task \x1b[96m'data-prep'\x1b[0m\n"
        "    [KFP Executor 2026-11-25 21:51:53,329 INFO]: Looking for component\n"
        f"    \x1b[32m{PROGRESS_PREFIX} teacher epoch 4/20\x1b[0m\n"
        "    [kdflow-timing] step=data-prep compute_s=0.032 wall_s=0.033\n"
        "21:51:53.287 - INFO - Task 'data-prep' finished with status SUCCESS\n"
    )
    assert log.write(text) == len(text)
    log.file.close()
    assert console.getvalue() == (
        "21:51:50.594 - INFO - Executing task 'data-prep'\n"
        f"{PROGRESS_PREFIX} teacher epoch 4/20\n"
        "21:51:53.287 - INFO - Task 'data-prep' finished with status SUCCESS\n"
    )
    assert (tmp_path / "run.log").read_text() == text  # the log keeps everything, colours included


def test_progress_log_verbose_shows_everything(tmp_path):
    console = io.StringIO()
    log = ProgressLog(tmp_path / "run.log", console, verbose=True)
    log.write("noise\n")
    assert log.tail() == "noise\n"  # what a failure message quotes
    log.file.close()
    assert console.getvalue() == "noise\n"
