"""An exclusive lock on a file, held by one process at a time: the kernel's flock, so it goes with the process
however that ends (no stale lock after a kill). Used where processes share a folder: a local run's home, a
location in the s3 cache. Where there is no flock (Windows) nothing is locked."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock on `path` (created if missing) for the block. When another process holds it, `waiting` is
    told who ("pid N", as the holder wrote into the file) before this one blocks until it is free."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            if waiting is not None:
                waiting(f.read().strip() or "another process")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
