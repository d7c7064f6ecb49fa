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
    from kdflow.runner import entrypoints
    from kdflow.runner.stepserver import run_step

    stale = run_step(
        entrypoints.finalize,
        state=status.state,
        error_message=status.error_message or "",
        config_json=config_json,
        tracking_uri=tracking_uri,
        pipeline_run_id=pipeline_run_id,
        pipeline_run_name=pipeline_run_name,
    )
    print(f"pipeline {status.state}; its MLflow run is closed; runs left RUNNING, now FAILED: {stale}")
