"""What each pipeline component runs: plain strings in, JSON-able results out.

A component adapts KFP artifacts to one of these calls through `kdflow.stepserver.run_step`, which runs it in
the component's own process (a pod) or, in the local runner, in a child forked from a warm process. Each prints
a `[kdflow-timing]` line: the step's own compute against its wall time (`kdflow.timing`).
"""

from __future__ import annotations

import functools
import time

from kdflow import timing


def _timed(step: str):
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            timing.reset()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timing.report(step, time.perf_counter() - start)

        return run

    return wrap


def _context(run: list[str]):
    """The step's StepContext from the pipeline-run strings every component passes on: config_json,
    tracking_uri, pipeline_run_id, pipeline_run_name."""
    from kdflow import steps

    return steps.StepContext.open(*run)


@_timed("data-prep")
def data_prep(config_json: str, data: str) -> dict:
    from kdflow import steps
    from kdflow.config import config_from_json

    manifest = steps.prepare_data(config_from_json(config_json), data)
    origins = [t["origin"]["uri"] for t in manifest["tasks"].values() if "origin" in t]
    return {"content_hash": manifest["content_hash"], "setup": manifest["setup"], "origins": origins}


@_timed("teacher")
def teacher(run: list[str], data: str, teacher: str) -> dict:
    from kdflow import steps

    ctx = _context(run)
    steps.record_data(ctx, data)  # data prep is store-free (cacheable): the first step after it logs it
    return steps.train_teacher(ctx, data, teacher)


@_timed("prune")
def prune(run: list[str], data: str, teacher: str, pruned: str) -> list[dict]:
    from kdflow import steps

    return steps.prune_teacher(_context(run), data, teacher, pruned)


@_timed("distill")
def distill(run: list[str], candidates: str, data: str, teacher: str, pruned: str, student: str) -> dict:
    from kdflow import steps

    names = [n.strip() for n in candidates.split(",") if n.strip()]
    return steps.distill(_context(run), names, data, teacher, pruned, student)


@_timed("evaluate")
def evaluate(run: list[str], data: str, teacher: str, student: str, report: str) -> list[dict]:
    from kdflow import steps

    return steps.evaluate_candidates(_context(run), data, teacher, student, report)


@_timed("register")
def register(run: list[str], data: str, teacher: str, students: list[str], reports: list[str], decision: str) -> dict:
    from kdflow import steps

    return steps.register(_context(run), data, teacher, students, reports, decision)


@_timed("finalize")
def finalize(run: list[str], state: str, error_message: str) -> list[str]:
    from kdflow import steps

    detail = f"{state}: {error_message}" if error_message else state
    return steps.finalize(_context(run), state == "SUCCEEDED", detail)
