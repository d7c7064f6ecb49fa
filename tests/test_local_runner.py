"""The local runner's console: progress lines only, the whole of kfp.local's output in the run log."""

from __future__ import annotations

import io
import os

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


def test_a_second_run_on_the_same_home_waits_for_the_first(tmp_path):
    import fcntl
    import threading
    import time

    from kdflow.pipelines.local import LOCK_FILE, home_lock

    notice = io.StringIO()
    events = []
    with home_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"pid {os.getpid()}"  # who holds it, for the message

        def second():
            with home_lock(tmp_path, notice):
                events.append("second in")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        assert events == []  # still waiting
        events.append("first out")
    t.join(10)
    assert events == ["first out", "second in"]
    assert notice.getvalue() == f"waiting for the other kdflow run on {tmp_path} (pid {os.getpid()}) to finish\n"
    with (tmp_path / LOCK_FILE).open() as f:  # released: free to take
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
