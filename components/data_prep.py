from kfp import dsl
from kfp.dsl import Dataset, Output

from kdflow.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data_prep(data: Output[Dataset], config_json: str, tracking_uri: str, pipeline_run_id: str, pipeline_run_name: str):
    """Step 1: source and target tasks, hashed splits, manifest."""
    from kdflow import steps

    ctx = steps.StepContext.open(config_json, tracking_uri, pipeline_run_id, pipeline_run_name)
    manifest = steps.prepare_data(ctx, data.path)
    data.metadata.update({"content_hash": manifest["content_hash"], "setup": manifest["setup"]})
