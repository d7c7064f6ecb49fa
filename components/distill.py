from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from kdflow.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(
    data: Input[Dataset],
    teacher: Input[Model],
    pruned: Input[Model],
    student: Output[Model],
    candidate: str,
    config_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_run_name: str,
):
    """Step 4: train one candidate (student × loss) with the teacher's soft targets."""
    from kdflow import steps

    ctx = steps.StepContext.open(config_json, tracking_uri, pipeline_run_id, pipeline_run_name)
    result = steps.distill(ctx, candidate, data.path, teacher.path, pruned.path, student.path)
    student.metadata.update({"candidate": candidate, **result})
