"""What each pipeline component runs: keyword strings in, JSON-able results out.

A component passes one of these functions to `kdflow.runner.stepserver.run_step`, which calls it in the
component's own process (a pod) or, in the local runner, in a child forked from a warm process. Every entry
point takes the pipeline-run strings (`config_json`, `tracking_uri`, `pipeline_run_id`, `pipeline_run_name`)
and its artifact paths by keyword, opens the step's context and calls one step function. Each prints a
`[kdflow-timing]` line: the step's own compute against its wall time (`kdflow.runtime.timing`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path

from kdflow.runtime import timing
from kdflow.tracking import PROGRESS_PREFIX, RESUME_ENV


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


DONE_SUFFIX = ".kdflow-step.json"  # beside a finished step's output (a folder or a file): its result, for reuse
REUSE_ARGS = ("candidates",)  # the arguments besides config and paths that tell a step's loop iterations apart


def _reusable(step: str, output: str):
    """A step a resumed local run (`kdflow run --resume`) takes over when the run it continues finished it: the
    earlier output (the same place under that run's folder) is copied and its recorded result returned. Every
    finished step records its result beside its output (`DONE_SUFFIX`), outside what later steps read."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(**kwargs):
            out = Path(kwargs[output])
            args = {k: kwargs[k] for k in REUSE_ARGS if k in kwargs}
            earlier = earlier_output(out)
            done = earlier.with_name(earlier.name + DONE_SUFFIX) if earlier is not None else None
            if done is not None and done.is_file():
                record = json.loads(done.read_text())
                if record["args"] == args:
                    if earlier.is_dir():
                        shutil.copytree(earlier, out, dirs_exist_ok=True)
                    else:
                        shutil.copy2(earlier, out)
                    shutil.copy2(done, out.with_name(out.name + DONE_SUFFIX))  # a later resume reuses it again
                    print(f"{PROGRESS_PREFIX} {step}: reused the output of the interrupted run it resumes", flush=True)
                    return record["result"]
            result = fn(**kwargs)
            try:
                out.with_name(out.name + DONE_SUFFIX).write_text(json.dumps({"args": args, "result": result}))
            except OSError as err:  # a pod's artifact mount may refuse it: only a local resume reads it
                print(f"{PROGRESS_PREFIX} {step}: could not record its result for a resume ({err})", flush=True)
            return result

        return run

    return wrap


def earlier_output(path: Path) -> Path | None:
    """In a resumed local run, where the run it continues kept the output now due at `path`: the same place
    under that run's folder of the local pipeline root. None when not resuming or `path` lies elsewhere."""
    plan = os.environ.get(RESUME_ENV)
    if not plan:
        return None
    earlier = json.loads(plan)
    try:
        rel = path.resolve().relative_to(Path(earlier["root"]).resolve())
    except ValueError:
        return None
    return Path(earlier["run_dir"]).joinpath(*rel.parts[1:]) if len(rel.parts) > 1 else None


PERMANENT_TAG = "kdflow.permanent_error"  # parent-run tag prefix: `<prefix>.<step>[.<iteration>]` -> the error


class NotRetried(RuntimeError):
    """A retry of a step whose earlier attempt failed with a permanent error: it fails at once, without work."""


def _guarded(ctx, step: str, call, iteration: str = ""):
    """Run one step attempt: refuse at once when an earlier attempt of the same step (and loop iteration) of this
    pipeline run failed permanently, and record a permanent failure (kdflow's ConfigError, DataError or
    ModelError: the input's fault) on the parent run for the next attempt. Anything else (a node without the
    GPUs asked for, a store hiccup, a worker that died) stays retryable. KFP retries every failure alike (its
    retry policy reads no exit codes), so a retried attempt of a bad config or data set costs only this check."""
    import hashlib

    from kdflow import tracking
    from kdflow.errors import ConfigError, DataError, ModelError
    from kdflow.secrets import redact

    key = f"{PERMANENT_TAG}.{step}" + (f".{hashlib.sha1(iteration.encode()).hexdigest()[:10]}" if iteration else "")
    try:
        earlier = tracking.client().get_run(ctx.parent_id).data.tags.get(key)
    except Exception:  # the store hiccuped: unknown, so the attempt goes ahead
        earlier = None
    if earlier is not None:
        raise NotRetried(f"not retried: an earlier attempt failed permanently: {earlier}")
    try:
        return call()
    except (ConfigError, DataError, ModelError) as err:  # the input's fault, not the node's: the same next time
        try:
            tracking.set_tags_on(ctx.parent_id, {key: redact(f"{type(err).__name__}: {err}")[:4900]})
        except Exception:
            pass  # unrecorded: a retry then runs again, as before
        raise


def _context(config_json: str, tracking_uri: str, pipeline_run_id: str, pipeline_run_name: str):
    from kdflow.steps.context import StepContext  # deferred: torch and MLflow load in the step, not at import

    return StepContext.open(
        config_json=config_json,
        tracking_uri=tracking_uri,
        pipeline_run_id=pipeline_run_id,
        pipeline_run_name=pipeline_run_name,
    )


@_timed("data-prep")
@_reusable("data-prep", "data")
def data_prep(*, config_json: str, data: str) -> dict:
    from kdflow.config import config_from_json
    from kdflow.steps.data_prep import prepare_data

    manifest = prepare_data(config_from_json(config_json), data)
    origins = [t["origin"]["uri"] for t in manifest["tasks"].values() if "origin" in t]
    return {"content_hash": manifest["content_hash"], "setup": manifest["setup"], "origins": origins}


@_timed("teacher")
@_reusable("teacher", "teacher")
def teacher(*, data: str, teacher: str, **run: str) -> dict:
    from kdflow.steps.data_prep import record_data
    from kdflow.steps.teacher import train_teacher

    ctx = _context(**run)

    def call():
        record_data(ctx, data)  # data prep is store-free (cacheable): the first step after it logs it
        return train_teacher(ctx, data, teacher)

    return _guarded(ctx, "teacher", call)


@_timed("prune")
@_reusable("prune", "pruned")
def prune(*, data: str, teacher: str, pruned: str, **run: str) -> list[dict]:
    from kdflow.steps.prune import prune_teacher

    ctx = _context(**run)
    return _guarded(ctx, "prune", lambda: prune_teacher(ctx, data, teacher, pruned))


@_timed("distill")
@_reusable("distill", "student")
def distill(*, candidates: str, data: str, teacher: str, pruned: str, student: str, **run: str) -> dict:
    from kdflow.steps.distill import distill as distill_step

    names = [n.strip() for n in candidates.split(",") if n.strip()]
    ctx = _context(**run)
    return _guarded(ctx, "distill", lambda: distill_step(ctx, names, data, teacher, pruned, student), candidates)


@_timed("evaluate")
@_reusable("evaluate", "report")
def evaluate(*, data: str, teacher: str, student: str, report: str, **run: str) -> list[dict]:
    from kdflow.steps.evaluate import evaluate_candidates

    ctx = _context(**run)
    return _guarded(ctx, "evaluate", lambda: evaluate_candidates(ctx, data, teacher, student, report), student)


@_timed("register")
def register(*, data: str, teacher: str, students: list[str], reports: list[str], decision: str, **run: str) -> dict:
    from kdflow.steps.register import register as register_step

    return register_step(_context(**run), data, teacher, students, reports, decision)


@_timed("finalize")
def finalize(*, state: str, error_message: str, **run: str) -> list[str]:
    from kdflow.steps.finalize import finalize as finalize_step

    detail = f"{state}: {error_message}" if error_message else state
    return finalize_step(_context(**run), state == "SUCCEEDED", detail)
