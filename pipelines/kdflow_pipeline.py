"""The one kdflow pipeline: data prep → teacher → prune → (distill → evaluate) per candidate → register.

The pipeline only wires components. Cluster placement (accelerators) comes from the config's `cluster`
section at build time, because KFP fixes resources in the compiled spec; everything else is a run parameter.
"""

from kfp import dsl

from kdflow.components import data_prep, distill, evaluate, prune, register, train_teacher
from kdflow.config import ClusterConfig

PIPELINE_NAME = "kdflow"


def build_pipeline(cluster: "ClusterConfig | None" = None):
    """Return the pipeline function with GPU requests set for `cluster` (default: one NVIDIA GPU)."""
    cluster = cluster or ClusterConfig()

    def on_gpu(task):
        if cluster.gpus > 0:
            task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(cluster.gpus)
        return task

    @dsl.pipeline(name=PIPELINE_NAME, description="Transfer learning, pruning and knowledge distillation.")
    def kdflow_pipeline(config_json: str, candidates: list, tracking_uri: str = "") -> dsl.Artifact:
        run = dict(
            config_json=config_json,
            tracking_uri=tracking_uri,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            pipeline_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        )
        data = data_prep(**run).set_display_name("data-prep")
        teacher = on_gpu(train_teacher(data=data.outputs["data"], **run).set_display_name("teacher"))
        pruned = prune(data=data.outputs["data"], teacher=teacher.outputs["teacher"], **run).set_display_name("prune")
        with dsl.ParallelFor(candidates) as name:
            student = on_gpu(
                distill(
                    data=data.outputs["data"],
                    teacher=teacher.outputs["teacher"],
                    pruned=pruned.outputs["pruned"],
                    candidate=name,
                    **run,
                ).set_display_name("distill")
            )
            scored = on_gpu(
                evaluate(
                    data=data.outputs["data"],
                    teacher=teacher.outputs["teacher"],
                    student=student.outputs["student"],
                    **run,
                ).set_display_name("evaluate")
            )
        decision = register(
            data=data.outputs["data"],
            teacher=teacher.outputs["teacher"],
            students=dsl.Collected(student.outputs["student"]),
            reports=dsl.Collected(scored.outputs["report"]),
            **run,
        ).set_display_name("register")
        return decision.outputs["decision"]

    return kdflow_pipeline
