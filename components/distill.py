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
    from kdflow.runner import entrypoints
    from kdflow.runner.stepserver import run_step

    results = run_step(
        entrypoints.distill,
        candidates=candidates,
        data=data.path,
        teacher=teacher.path,
        pruned=pruned.path,
        student=student.path,
        config_json=config_json,
        tracking_uri=tracking_uri,
        pipeline_run_id=pipeline_run_id,
        pipeline_run_name=pipeline_run_name,
    )
    student.metadata["candidates"] = list(results)
    student.metadata.update({f"{n}.best_val_top1": r["best_val_top1"] for n, r in results.items()})
