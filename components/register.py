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
    from kdflow.runner import entrypoints
    from kdflow.runner.stepserver import run_step

    result = run_step(
        entrypoints.register,
        data=data.path,
        teacher=teacher.path,
        students=[s.path for s in students],
        reports=[r.path for r in reports],
        decision=decision.path,
        config_json=config_json,
        tracking_uri=tracking_uri,
        pipeline_run_id=pipeline_run_id,
        pipeline_run_name=pipeline_run_name,
    )
    summary.log_metric("promoted", float(result["decision"]["promoted"]))
    summary.log_metric("candidates", float(len(result["candidates"])))
    decision.metadata.update({k: v for k, v in result["decision"].items() if k in ("selected", "promoted", "reason")})
