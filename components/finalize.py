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
    from kdflow.stepserver import run_step

    run = [config_json, tracking_uri, pipeline_run_id, pipeline_run_name]
    stale = run_step("finalize", run, status.state, status.error_message or "")
    print(f"pipeline {status.state}; its MLflow run is closed; runs left RUNNING, now FAILED: {stale}")
