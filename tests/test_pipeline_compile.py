"""The compiled IR YAML: six steps, a ParallelFor over the candidates, GPUs on the training steps."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from kdflow import __version__
from kdflow.cli import app
from kdflow.config import Config, load_config
from kdflow.pipelines.compile import compile_pipeline

STEPS = {"data-prep", "train-teacher", "prune", "distill", "evaluate", "register"}
GPU_STEPS = {"train-teacher", "distill", "evaluate"}


def _compile(tmp_path, cfg: Config) -> dict:
    path = compile_pipeline(cfg, tmp_path / "p.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0]


def test_six_components_and_parallel_for(tmp_path):
    cfg = Config()
    spec = _compile(tmp_path, cfg)
    assert set(spec["components"]) == {f"comp-{s}" for s in STEPS} | {"comp-for-loop-1"}
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"data-prep", "train-teacher", "prune", "for-loop-1", "register"}
    loop = root["for-loop-1"]
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--candidates"}
    assert set(spec["components"]["comp-for-loop-1"]["dag"]["tasks"]) == {"distill", "evaluate"}
    # register collects every iteration's student and report
    reg = root["register"]["inputs"]["artifacts"]
    assert reg["students"]["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    assert reg["reports"]["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    assert root["train-teacher"]["dependentTasks"] == ["data-prep"]


def test_run_parameters_default_to_the_config(tmp_path):
    cfg = load_config(None, {"distill.train.epochs": 7})
    params = _compile(tmp_path, cfg)["root"]["inputDefinitions"]["parameters"]
    assert params["candidates"]["defaultValue"] == [c["name"] for c in cfg.candidates()]
    assert len(params["candidates"]["defaultValue"]) == 6
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


def test_cli_compile_writes_yaml_and_rejects_bad_config(tmp_path):
    runner = CliRunner()
    out = tmp_path / "pipeline.yaml"
    result = runner.invoke(app, ["compile", "--output", str(out), "--set", "distill.train.epochs=3"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load_all(out.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  train:\n    epochz: 3\n")
    result = runner.invoke(app, ["compile", "--config", str(bad), "--output", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2
    assert "distill.train.epochz" in result.output and "unknown key" in result.output
    assert not (tmp_path / "x.yaml").exists()
