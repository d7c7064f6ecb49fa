"""What each pipeline component runs: keyword strings in, JSON-able results out.

A component passes one of these functions to `kdflow.runner.stepserver.run_step`, which calls it in the
component's own process (a pod) or, in the local runner, in a child forked from a warm process. Every entry
point takes the pipeline-run strings (`config_json`, `tracking_uri`, `pipeline_run_id`, `pipeline_run_name`)
and its artifact paths by keyword, opens the step's context and calls one step function. Each prints a
`[kdflow-timing]` line: the step's own compute against its wall time (`kdflow.runtime.timing`).
"""

from __future__ import annotations

import functools
import time

from kdflow.runtime import timing


def _timed(step: str):
    def wrap(fn):
        @functools.wraps(fn)
        def run(**kwargs):
            timing.reset()
            start = time.perf_counter()
            try:
                return fn(**kwargs)
            finally:
                timing.report(step, time.perf_counter() - start)

        return run

    return wrap


def _context(config_json: str, tracking_uri: str, pipeline_run_id: str, pipeline_run_name: str):
    from kdflow.steps.context import StepContext  # deferred: torch and MLflow load in the step, not at import

    return StepContext.open(
        config_json=config_json,
        tracking_uri=tracking_uri,
        pipeline_run_id=pipeline_run_id,
        pipeline_run_name=pipeline_run_name,
    )


@_timed("data-prep")
def data_prep(*, config_json: str, data: str) -> dict:
    from kdflow.config import config_from_json
    from kdflow.steps.data_prep import prepare_data

    manifest = prepare_data(config_from_json(config_json), data)
    origins = [t["origin"]["uri"] for t in manifest["tasks"].values() if "origin" in t]
    return {"content_hash": manifest["content_hash"], "setup": manifest["setup"], "origins": origins}


@_timed("teacher")
def teacher(*, data: str, teacher: str, **run: str) -> dict:
    from kdflow.steps.data_prep import record_data
    from kdflow.steps.teacher import train_teacher

    ctx = _context(**run)
    record_data(ctx, data)  # data prep is store-free (cacheable): the first step after it logs it
    return train_teacher(ctx, data, teacher)


@_timed("prune")
def prune(*, data: str, teacher: str, pruned: str, **run: str) -> list[dict]:
    from kdflow.steps.prune import prune_teacher

    return prune_teacher(_context(**run), data, teacher, pruned)


@_timed("distill")
def distill(*, candidates: str, data: str, teacher: str, pruned: str, student: str, **run: str) -> dict:
    from kdflow.steps.distill import distill as distill_step

    names = [n.strip() for n in candidates.split(",") if n.strip()]
    return distill_step(_context(**run), names, data, teacher, pruned, student)


@_timed("evaluate")
def evaluate(*, data: str, teacher: str, student: str, report: str, **run: str) -> list[dict]:
    from kdflow.steps.evaluate import evaluate_candidates

    return evaluate_candidates(_context(**run), data, teacher, student, report)


@_timed("register")
def register(*, data: str, teacher: str, students: list[str], reports: list[str], decision: str, **run: str) -> dict:
    from kdflow.steps.register import register as register_step

    return register_step(_context(**run), data, teacher, students, reports, decision)


@_timed("finalize")
def finalize(*, state: str, error_message: str, **run: str) -> list[str]:
    from kdflow.steps.finalize import finalize as finalize_step

    detail = f"{state}: {error_message}" if error_message else state
    return finalize_step(_context(**run), state == "SUCCEEDED", detail)
