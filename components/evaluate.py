from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from kdflow.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    data: Input[Dataset],
    teacher: Input[Model],
    student: Input[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[Artifact],
    config_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_run_name: str,
):
    """Step 5: accuracy, calibration, teacher agreement, size, FLOPs and CPU latency of each candidate."""
    from kdflow.runner import entrypoints
    from kdflow.runner.stepserver import run_step

    reports = run_step(
        entrypoints.evaluate,
        data=data.path,
        teacher=teacher.path,
        student=student.path,
        report=report.path,
        config_json=config_json,
        tracking_uri=tracking_uri,
        pipeline_run_id=pipeline_run_id,
        pipeline_run_name=pipeline_run_name,
    )
    for r in reports:
        for key, value in r["metrics"].items():
            metrics.log_metric(f"{r['name']}.{key}" if len(reports) > 1 else key, value)
    best = max(reports, key=lambda r: r["metrics"]["val_top1"])  # KFP shows one matrix per artifact
    confusion.log_confusion_matrix(best["classes"], best["confusion_matrix"])
    confusion.metadata["candidate"] = best["name"]
    report.metadata["candidates"] = [r["name"] for r in reports]
