"""The compiled IR YAML: six steps, a ParallelFor over the candidates, GPUs on the training steps."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from kdflow import __version__
from kdflow.cli import app
from kdflow.config import Config, ConfigError, load_config
from kdflow.pipelines.compile import compile_pipeline
from tests.helpers.pipeline import all_tasks

STEPS = {"data-prep", "train-teacher", "prune", "distill", "evaluate", "register", "finalize"}
GPU_STEPS = {"train-teacher", "distill", "evaluate"}
BODY = "comp-exit-handler-1"


def _compile_docs(tmp_path, cfg: Config) -> tuple[dict, dict]:
    """(pipeline spec, Kubernetes platform spec) of the compiled YAML."""
    path = compile_pipeline(cfg, tmp_path / "p.yaml")
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _compile(tmp_path, cfg: Config) -> dict:
    return _compile_docs(tmp_path, cfg)[0]


def test_six_components_in_an_exit_handler_and_parallel_for(tmp_path):
    cfg = Config()
    spec = _compile(tmp_path, cfg)
    assert set(spec["components"]) == {f"comp-{s}" for s in STEPS} | {"comp-for-loop-2", BODY}
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finalize"}
    body = spec["components"][BODY]["dag"]["tasks"]
    assert set(body) == {"data-prep", "train-teacher", "prune", "for-loop-2", "register"}
    loop = body["for-loop-2"]
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--candidates"}
    assert set(spec["components"]["comp-for-loop-2"]["dag"]["tasks"]) == {"distill", "evaluate"}
    # register collects every iteration's student and report
    reg = body["register"]["inputs"]["artifacts"]
    assert reg["students"]["taskOutputArtifact"]["producerTask"] == "for-loop-2"
    assert reg["reports"]["taskOutputArtifact"]["producerTask"] == "for-loop-2"
    assert body["train-teacher"]["dependentTasks"] == ["data-prep"]
    # data prep sees only the config, so a rerun of the same config can hit the cache
    assert body["data-prep"]["inputs"]["parameters"] == {
        "config_json": {"componentInputParameter": "pipelinechannel--config_json"}
    }


def test_finalize_is_the_exit_handler(tmp_path):
    final = _compile(tmp_path, Config())["root"]["dag"]["tasks"]["finalize"]
    assert final["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    assert final["dependentTasks"] == ["exit-handler-1"]
    assert final["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert final["inputs"]["parameters"]["pipeline_run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}


def test_run_parameters_default_to_the_config(tmp_path):
    cfg = load_config(None, {"distill.train.epochs": 7})
    params = _compile(tmp_path, cfg)["root"]["inputDefinitions"]["parameters"]
    # six candidates, three per distill step, those whose transfer sets use source images apart
    assert params["candidates"]["defaultValue"] == [
        "cnn4-ce,cnn8-ce",
        "cnn4-kd,cnn4-logit_mse,cnn8-kd",
        "cnn8-logit_mse",
    ]
    one_each = load_config(None, {"distill.candidates_per_step": 1})
    one = _compile(tmp_path, one_each)["root"]["inputDefinitions"]["parameters"]["candidates"]["defaultValue"]
    assert sorted(one) == sorted(c.name for c in one_each.candidates()) and len(one) == 6
    assert json.loads(params["config_json"]["defaultValue"])["distill"]["train"]["epochs"] == 7


@pytest.mark.parametrize("gpus", [1, 2])
def test_gpu_requests_on_training_steps_only(tmp_path, gpus):
    spec = _compile(tmp_path, load_config(None, {"cluster.gpus": gpus}))
    for step in STEPS:
        container = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]
        accel = container.get("resources", {}).get("accelerator")
        if step in GPU_STEPS:
            assert accel["resourceType"] == "nvidia.com/gpu"
            assert accel["resourceCount"] == str(gpus)
        else:
            assert accel is None


def test_cpu_only_cluster_requests_no_gpu(tmp_path):
    spec = _compile(tmp_path, load_config(None, {"cluster.gpus": 0}))
    for ex in spec["deploymentSpec"]["executors"].values():
        assert "accelerator" not in ex["container"].get("resources", {})


def test_image_from_package_version_and_no_kfp_install(tmp_path):
    spec = _compile(tmp_path, Config())
    for name, ex in spec["deploymentSpec"]["executors"].items():
        container = ex["container"]
        assert container["image"] == f"ghcr.io/kdflow/kdflow:{__version__}", name
        assert "pip install" not in " ".join(container["command"]), name


def test_image_repository_and_tag_from_the_environment(tmp_path):
    """What `make push` builds is what the compiled pipeline runs: both read the same two variables."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "KDFLOW_IMAGE_REPOSITORY": "registry.example.com/ml/kdflow", "KDFLOW_IMAGE_TAG": "abc1234"}
    out = tmp_path / "p.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "kdflow.cli", "compile", "-o", str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    images = {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/ml/kdflow:abc1234"}
    make = subprocess.run(
        [sys.executable, "-c", "from kdflow.components.image import IMAGE; print(IMAGE)"],
        env={**env, "KDFLOW_IMAGE_TAG": ""},  # empty: the version
        capture_output=True,
        text=True,
    )
    assert make.stdout.strip() == f"registry.example.com/ml/kdflow:{__version__}"


def test_cli_compile_writes_yaml_and_rejects_bad_config(tmp_path):
    runner = CliRunner()
    out = tmp_path / "pipeline.yaml"
    result = runner.invoke(app, ["compile", "--output", str(out), "--set", "distill.train.epochs=3"])
    assert result.exit_code == 0, result.output
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "kdflow"
    baked = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
    assert baked["distill"]["train"]["epochs"] == 3  # the --set override became the run parameter's default
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  train:\n    epochz: 3\n")
    result = runner.invoke(app, ["compile", "--config", str(bad), "--output", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2
    assert "distill.train.epochz" in result.output and "unknown key" in result.output
    assert not (tmp_path / "x.yaml").exists()


CLUSTER = {
    "cluster.gpus": 2,
    "cluster.node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
    "cluster.tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "toleration_seconds": 300},
    ],
    "cluster.gpu_resources": {"cpu_request": "6", "cpu_limit": "12", "memory_request": "24G", "memory_limit": "48G"},
    "cluster.cpu_resources": {"cpu_request": "500m", "memory_limit": "3G"},
    "cluster.shm_size": "4Gi",
    "cluster.retry": {"max_retries": 3, "backoff": "20s", "backoff_factor": 3.0, "max_backoff": "900s"},
    "cluster.tracking_config_map": "team-mlflow",
    "cluster.s3_secret": "team-s3",
    "cluster.pipeline_root": "s3://kdflow-artifacts/pipelines",
}


def _executor(spec: dict, step: str) -> dict:
    return spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]


def test_gpu_steps_get_gpus_placement_resources_and_shm(tmp_path):
    spec, k8s = _compile_docs(tmp_path, load_config(None, CLUSTER))
    for step in GPU_STEPS:
        res = _executor(spec, step)["resources"]
        assert (res["accelerator"]["resourceType"], res["accelerator"]["resourceCount"]) == ("nvidia.com/gpu", "2")
        assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == ("6", "12")
        assert (res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == ("24G", "48G")
        assert k8s[f"exec-{step}"]["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
        assert k8s[f"exec-{step}"]["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {
                "key": "spot",
                "operator": "Equal",
                "value": "true",
                "effect": "NoExecute",
                "tolerationSeconds": "300",
            },  # int64 → JSON string
        ]
        assert k8s[f"exec-{step}"]["emptyDirMounts"] == [
            {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "4Gi"}
        ]
    for step in STEPS - GPU_STEPS:
        res = _executor(spec, step)["resources"]
        assert "accelerator" not in res
        assert res["resourceCpuRequest"] == "500m" and res["resourceMemoryLimit"] == "3G"
        assert "resourceCpuLimit" not in res and "resourceMemoryRequest" not in res
        assert {"nodeSelector", "tolerations", "emptyDirMounts"}.isdisjoint(k8s[f"exec-{step}"])


def test_every_step_reads_mlflow_uri_from_config_map_and_s3_keys_from_secret(tmp_path):
    spec, k8s = _compile_docs(tmp_path, load_config(None, CLUSTER))
    assert set(k8s) == {f"exec-{s}" for s in STEPS}
    for name, ex in k8s.items():
        (cm,) = ex["configMapAsEnv"]
        assert cm["configMapName"] == "team-mlflow" and cm["optional"] is True, name
        assert cm["keyToEnv"] == [
            {"configMapKey": "MLFLOW_TRACKING_URI", "envVar": "MLFLOW_TRACKING_URI"},
            {"configMapKey": "MLFLOW_S3_ENDPOINT_URL", "envVar": "MLFLOW_S3_ENDPOINT_URL"},
        ]
        (secret,) = ex["secretAsEnv"]
        assert secret["secretName"] == "team-s3" and secret["optional"] is True, name
        assert secret["keyToEnv"] == [
            {"secretKey": "AWS_ACCESS_KEY_ID", "envVar": "AWS_ACCESS_KEY_ID"},
            {"secretKey": "AWS_SECRET_ACCESS_KEY", "envVar": "AWS_SECRET_ACCESS_KEY"},
        ]


def test_retries_with_backoff_everywhere_but_data_prep_and_registration(tmp_path):
    tasks = all_tasks(_compile(tmp_path, load_config(None, CLUSTER)))
    for step in STEPS - {"register", "data-prep"}:
        assert tasks[step]["retryPolicy"] == {
            "maxRetryCount": 3,
            "backoffDuration": "20s",
            "backoffFactor": 3.0,
            "backoffMaxDuration": "900s",
        }, step
    assert "retryPolicy" not in tasks["register"]  # creating model versions twice is worse than failing
    assert "retryPolicy" not in tasks["data-prep"]  # its failures are the data's: retrying repeats them


@pytest.mark.parametrize("cache_data", [True, False])
def test_caching_on_for_data_prep_only(tmp_path, cache_data):
    tasks = all_tasks(_compile(tmp_path, load_config(None, {"cluster.cache_data_prep": cache_data})))
    assert tasks["data-prep"]["cachingOptions"] == ({"enableCache": True} if cache_data else {})
    for step in STEPS - {"data-prep"}:
        assert tasks[step]["cachingOptions"] == {}, step  # {} = caching off in the IR


def test_pipeline_root_and_optional_cluster_wiring(tmp_path):
    spec, k8s = _compile_docs(tmp_path, load_config(None, CLUSTER))
    assert spec["defaultPipelineRoot"] == "s3://kdflow-artifacts/pipelines"
    bare = load_config(
        None,
        {
            "cluster.tracking_config_map": None,
            "cluster.s3_secret": None,
            "cluster.shm_size": None,
            "cluster.retry.max_retries": 0,
        },
    )
    path = compile_pipeline(bare, tmp_path / "bare.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    assert "defaultPipelineRoot" not in docs[0]
    tasks = all_tasks(docs[0])
    assert all("retryPolicy" not in tasks[s] for s in STEPS)
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    for ex in executors.values():  # only the GPU steps' node placement remains
        assert set(ex) == {"tolerations"}


def test_bad_cluster_values_are_rejected_with_the_key_named():
    with pytest.raises(ConfigError, match=r"cluster.gpu_resources.memory_limit.*'32 gigs'"):
        load_config(None, {"cluster.gpu_resources.memory_limit": "32 gigs"})
    with pytest.raises(ConfigError, match=r"cluster.retry.backoff.*'1m'"):
        load_config(None, {"cluster.retry.backoff": "1m"})
    with pytest.raises(ConfigError, match=r"cluster\.tolerations\[0\]\.operator"):
        load_config(None, {"cluster.tolerations": [{"key": "gpu", "operator": "Maybe"}]})


def test_data_from_s3_is_never_served_from_the_cache(tmp_path):
    cfg = load_config(None, {"data.source": "s3://team-data/digits/", "data.image_size": 8})
    assert cfg.cluster.cache_data_prep is True
    tasks = all_tasks(_compile(tmp_path, cfg))
    assert tasks["data-prep"]["cachingOptions"] == {}


def test_teacher_can_get_more_gpus_than_the_students(tmp_path):
    spec = _compile(tmp_path, load_config(None, {"cluster.gpus": 1, "cluster.teacher_gpus": 4}))
    counts = {s: _executor(spec, s)["resources"]["accelerator"]["resourceCount"] for s in GPU_STEPS}
    assert counts == {"train-teacher": "4", "distill": "1", "evaluate": "1"}
