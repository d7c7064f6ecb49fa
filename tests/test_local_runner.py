"""The local runner: one run at a time on a home. (Its console, progress and run log: tests/test_progress.py.)"""

from __future__ import annotations

import io
import os


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
