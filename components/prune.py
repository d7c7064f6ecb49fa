from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from kdflow.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prune(
    data: Input[Dataset],
    teacher: Input[Model],
    pruned: Output[Model],
    metrics: Output[Metrics],
    config_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_run_name: str,
):
    """Step 3: structured channel pruning of the teacher, one network per configured ratio."""
    from kdflow.runner import entrypoints
    from kdflow.runner.stepserver import run_step

    rows = run_step(
        entrypoints.prune,
        data=data.path,
        teacher=teacher.path,
        pruned=pruned.path,
        config_json=config_json,
        tracking_uri=tracking_uri,
        pipeline_run_id=pipeline_run_id,
        pipeline_run_name=pipeline_run_name,
    )
    for row in rows:
        metrics.log_metric(f"ratio_{row['ratio']:g}_params_after", row["params_after"])
        metrics.log_metric(f"ratio_{row['ratio']:g}_macs_after", row["macs_after"])
