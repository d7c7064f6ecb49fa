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
    """Step 5: accuracy, calibration, teacher agreement, size, FLOPs and CPU latency of one candidate."""
    from kdflow import steps

    ctx = steps.StepContext.open(config_json, tracking_uri, pipeline_run_id, pipeline_run_name)
    result = steps.evaluate_candidate(ctx, data.path, teacher.path, student.path, report.path)
    for key, value in result["metrics"].items():
        metrics.log_metric(key, value)
    confusion.log_confusion_matrix(result["classes"], result["confusion_matrix"])
    report.metadata["candidate"] = result["name"]
