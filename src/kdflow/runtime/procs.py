"""This process's descendants, from /proc (Linux), so that an interrupted local run can stop every process it
started: the KFP executors, the step server, the steps it forked and their torchrun workers."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process this user can see."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended meanwhile
            continue
        # `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so split after its last ')'
        fields = text[text.rindex(")") + 2 :].split()
        out[int(stat.parent.name)] = int(fields[1])
    return out


def descendants(pid: int | None = None) -> list[int]:
    """Every living descendant of `pid` (default: this process), parents before their children."""
    root = os.getpid() if pid is None else pid
    if not Path("/proc").is_dir():  # pragma: no cover - not Linux
        return []
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(root, []))
    while todo:
        p = todo.pop(0)
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def kill_tree(pid: int | None = None) -> list[int]:
    """SIGKILL every descendant of `pid` (default: this process); returns their pids."""
    pids = descendants(pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
