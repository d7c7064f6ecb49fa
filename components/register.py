from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from kdflow.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    data: Input[Dataset],
    teacher: Input[Model],
    students: Input[list[Model]],
    reports: Input[list[Artifact]],
    decision: Output[Artifact],
    summary: Output[Metrics],
    config_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_run_name: str,
):
    """Step 6: register teacher and candidates in MLflow; promote the policy's pick if it beats the champion."""
    from kdflow.stepserver import run_step

    run = [config_json, tracking_uri, pipeline_run_id, pipeline_run_name]
    students, reports = [s.path for s in students], [r.path for r in reports]
    result = run_step("register", run, data.path, teacher.path, students, reports, decision.path)
    summary.log_metric("promoted", float(result["decision"]["promoted"]))
    summary.log_metric("candidates", float(len(result["candidates"])))
    decision.metadata.update({k: v for k, v in result["decision"].items() if k in ("selected", "promoted", "reason")})
