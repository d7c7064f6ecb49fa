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
    from kdflow.runner import entrypoints
    from kdflow.runner.stepserver import run_step

    result = run_step(
        entrypoints.teacher,
        data=data.path,
        teacher=teacher.path,
        config_json=config_json,
        tracking_uri=tracking_uri,
        pipeline_run_id=pipeline_run_id,
        pipeline_run_name=pipeline_run_name,
    )
    for key, value in result.items():
        metrics.log_metric(key, value)
    teacher.metadata["framework"] = "pytorch"
