"""The exit handler: close the pipeline's MLflow run with the pipeline's outcome."""

from __future__ import annotations

from kdflow import tracking
from kdflow.steps.context import CHECKPOINTS, StepContext


def finalize(ctx: StepContext, succeeded: bool, detail: str = "") -> list[str]:
    """Close the pipeline's MLflow run with the pipeline's outcome; runs whether the steps succeeded or not
    (KFP exit handler), so a killed pod cannot leave runs RUNNING. A pipeline that succeeded needs its training
    steps' epoch checkpoints no more: they are deleted. Returns the child runs it marked FAILED."""
    if succeeded:
        tracking.delete_run_artifacts(ctx.parent_id, CHECKPOINTS)
    return tracking.close_pipeline_run(ctx.experiment_id, ctx.parent_id, succeeded, detail)
