from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from kdflow.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(
    data: Input[Dataset],
    teacher: Input[Model],
    pruned: Input[Model],
    student: Output[Model],
    candidates: str,
    config_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_run_name: str,
):
    """Step 4: train candidates (student × loss, comma-separated names) side by side with the teacher's soft
    targets, sharing each batch's teacher outputs."""
    from kdflow.stepserver import run_step

    run = [config_json, tracking_uri, pipeline_run_id, pipeline_run_name]
    results = run_step("distill", run, candidates, data.path, teacher.path, pruned.path, student.path)
    student.metadata["candidates"] = list(results)
    student.metadata.update({f"{n}.best_val_top1": r["best_val_top1"] for n, r in results.items()})
