"""How long a step spends on its own compute, as opposed to process start, imports, MLflow and artifact I/O.

Steps wrap their compute (data building, training, prediction, pruning, profiling) in `compute()`; the entry
point prints one `[kdflow-timing]` line per step, which the local pipeline benchmark reads from the run log.
"""

from __future__ import annotations

import contextlib
import time

TIMING_PREFIX = "[kdflow-timing]"  # not "[kdflow]": the local runner keeps these out of the console
_seconds = 0.0
_depth = 0


@contextlib.contextmanager
def compute():
    """Count the block's wall time as compute (nested blocks count once)."""
    global _seconds, _depth
    _depth += 1
    start = time.perf_counter()
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _seconds += time.perf_counter() - start


def reset() -> None:
    global _seconds
    _seconds = 0.0


def compute_seconds() -> float:
    return _seconds


def report(step: str, wall_s: float) -> str:
    line = f"{TIMING_PREFIX} step={step} compute_s={_seconds:.3f} wall_s={wall_s:.3f}"
    print(line, flush=True)
    return line
