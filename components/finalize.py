from kfp import dsl

from kdflow.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finalize(
    status: dsl.PipelineTaskFinalStatus,
    config_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_run_name: str,
):
    """Exit handler: end the pipeline's MLflow run as FINISHED or FAILED, even after a killed pod."""
    from kdflow import steps

    ctx = steps.StepContext.open(config_json, tracking_uri, pipeline_run_id, pipeline_run_name)
    detail = f"{status.state}: {status.error_message}" if status.error_message else status.state
    stale = steps.finalize(ctx, status.state == "SUCCEEDED", detail)
    print(f"pipeline {status.state}; MLflow run {ctx.parent_id} closed; runs left RUNNING, now FAILED: {stale}")
