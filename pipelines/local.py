"""Run the same pipeline on this machine with kfp.local: every step a subprocess, MLflow in a SQLite file."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

from kdflow import tracking
from kdflow.config import Config
from kdflow.pipelines.compile import pipeline_arguments
from kdflow.pipelines.kdflow_pipeline import build_pipeline


LOCAL_PARALLELISM = 2  # kfp.local's cap on concurrent ParallelFor iterations


class PipelineFailed(RuntimeError):
    """A step of the local run failed; its traceback is in the step log printed above."""


def run_local(cfg: Config, home: Path, tracking_uri: str | None = None) -> dict:
    """Run the pipeline locally; return the registration step's summary (decision, teacher, candidates)."""
    import warnings

    from kfp import local

    home.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or tracking.embedded_tracking_uri(home)
    tracking.ensure_experiment(cfg.experiment, uri)  # creates the SQLite store once, before steps race for it
    # kfp.local runs up to two loop iterations at once: give each step its share of the cores, not all of them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // LOCAL_PARALLELISM)))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(home / "pipeline-root"))
    pipeline = build_pipeline(cfg.cluster)
    original_print = builtins.print  # kfp.local swaps print() to indent step logs and may not restore it
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            task = pipeline(**pipeline_arguments(cfg, uri))
    except RuntimeError as err:
        raise PipelineFailed(str(err)) from None
    finally:
        builtins.print = original_print
    decision = task.outputs["Output"]
    return json.loads(Path(decision.path).read_text())
