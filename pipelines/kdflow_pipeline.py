"""The one kdflow pipeline: data prep → teacher → prune → (distill → evaluate) per candidate → register,
inside an exit handler that closes the pipeline's MLflow run whatever happened.

The pipeline only wires components. Cluster settings (GPUs, node placement, resources, /dev/shm, retries,
caching, where the MLflow URI and S3 credentials come from, the pipeline root) come from the config's
`cluster` section at build time, because KFP fixes them in the compiled spec; everything else is a run
parameter. kfp.local ignores the Kubernetes settings, so the local run executes the same definition.
"""

from kfp import dsl, kubernetes

from kdflow.components import data_prep, distill, evaluate, finalize, prune, register, train_teacher
from kdflow.config import ClusterConfig

PIPELINE_NAME = "kdflow"
SHM_VOLUME = "dshm"


def place(task, cluster: ClusterConfig, training: bool, retry: bool = True, gpus: int | None = None):
    """Resources, GPU placement, env from the ConfigMap/Secret and retries for one task."""
    gpus = cluster.gpus if gpus is None else gpus
    gpu = training and gpus > 0
    res = cluster.gpu_resources if gpu else cluster.cpu_resources
    for value, setter in (
        (res.cpu_request, task.set_cpu_request),
        (res.cpu_limit, task.set_cpu_limit),
        (res.memory_request, task.set_memory_request),
        (res.memory_limit, task.set_memory_limit),
    ):
        if value:
            setter(value)
    if gpu:
        task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(gpus)
        for key, value in cluster.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in cluster.tolerations:
            kubernetes.add_toleration(
                task,
                key=t.key,
                operator=t.operator,
                value=t.value,
                effect=t.effect,
                toleration_seconds=t.toleration_seconds,
            )
    if training and cluster.shm_size:  # the default 64M /dev/shm starves data loaders and NCCL
        kubernetes.empty_dir_mount(
            task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory", size_limit=cluster.shm_size
        )
    if cluster.tracking_config_map:
        kubernetes.use_config_map_as_env(
            task, cluster.tracking_config_map, {k: k for k in cluster.config_map_keys}, optional=True
        )
    if cluster.s3_secret:
        kubernetes.use_secret_as_env(task, cluster.s3_secret, {k: k for k in cluster.secret_keys}, optional=True)
    r = cluster.retry
    if retry and r.max_retries:
        task.set_retry(
            num_retries=r.max_retries,
            backoff_duration=r.backoff,
            backoff_factor=r.backoff_factor,
            backoff_max_duration=r.max_backoff,
        )
    return task


def build_pipeline(cluster: "ClusterConfig | None" = None):
    """Return the pipeline function with the placement and resources of `cluster` (default: ClusterConfig())."""
    cluster = cluster or ClusterConfig()
    cpu, gpu = dict(cluster=cluster, training=False), dict(cluster=cluster, training=True)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Transfer learning, pruning and knowledge distillation.",
        pipeline_root=cluster.pipeline_root,
    )
    def kdflow_pipeline(config_json: str, candidates: list, tracking_uri: str = ""):
        run = dict(
            config_json=config_json,
            tracking_uri=tracking_uri,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            pipeline_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        )
        closer = place(finalize(**run).set_display_name("finalize"), **cpu).set_caching_options(False)
        with dsl.ExitHandler(closer, name="pipeline"):
            # store-free, so its cache can hit; every later step logs to MLflow and must run every time
            # not retried: its failures are the data's (a bad path, label or file); boto3 retries S3 hiccups itself
            data = place(data_prep(config_json=config_json).set_display_name("data-prep"), **cpu, retry=False)
            data.set_caching_options(cluster.cache_data_prep)
            dataset = data.outputs["data"]
            teacher = place(
                train_teacher(data=dataset, **run).set_display_name("teacher"),
                **gpu,
                gpus=cluster.teacher_gpus,  # several GPUs here train the teacher with DDP (kdflow.steps.teacher_ddp)
            )
            model = teacher.outputs["teacher"]
            pruned = place(prune(data=dataset, teacher=model, **run).set_display_name("prune"), **cpu)
            with dsl.ParallelFor(candidates) as group:  # items: candidate names, comma-joined when trained together
                student = distill(data=dataset, teacher=model, pruned=pruned.outputs["pruned"], candidates=group, **run)
                student = place(student.set_display_name("distill"), **gpu)
                scored = evaluate(data=dataset, teacher=model, student=student.outputs["student"], **run)
                scored = place(scored.set_display_name("evaluate"), **gpu)
            # not retried: a retry after a half-done registration would create model versions twice
            registered = register(
                data=dataset,
                teacher=model,
                students=dsl.Collected(student.outputs["student"]),
                reports=dsl.Collected(scored.outputs["report"]),
                **run,
            )
            registered = place(registered.set_display_name("register"), **cpu, retry=False)
            for task in (teacher, pruned, student, scored, registered):
                task.set_caching_options(False)

    return kdflow_pipeline
