from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from kdflow.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_teacher(
    data: Input[Dataset],
    teacher: Output[Model],
    metrics: Output[Metrics],
    config_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_run_name: str,
):
    """Step 2: pretrain on the source task, fine-tune on the target task with a new head."""
    from kdflow import steps

    ctx = steps.StepContext.open(config_json, tracking_uri, pipeline_run_id, pipeline_run_name)
    steps.record_data(ctx, data.path)  # data prep is store-free (cacheable): the first step after it logs it
    for key, value in steps.train_teacher(ctx, data.path, teacher.path).items():
        metrics.log_metric(key, value)
    teacher.metadata["framework"] = "pytorch"
