"""The exit handler: close the pipeline's MLflow run with the pipeline's outcome."""

from __future__ import annotations

from kdflow import tracking
from kdflow.steps.context import StepContext


def finalize(ctx: StepContext, succeeded: bool, detail: str = "") -> list[str]:
    """Close the pipeline's MLflow run with the pipeline's outcome; runs whether the steps succeeded or not
    (KFP exit handler), so a killed pod cannot leave runs RUNNING. Returns the child runs it marked FAILED."""
    return tracking.close_pipeline_run(ctx.experiment_id, ctx.parent_id, succeeded, detail)
