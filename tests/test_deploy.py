"""ONNX export, parity, INT8 quantization and ONNX Runtime timing (`kdflow.deploy`), the speed-up check, and an
exported model served by `mlflow models serve` answering /invocations on 127.0.0.1."""

from __future__ import annotations

import json
import os
import sys
import urllib.request

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from kdflow import deploy, evaluate, tracking
from kdflow.config import load_config
from kdflow.data import Normalizer
from kdflow.errors import ModelError
from kdflow.models import zoo
from kdflow.steps.context import ServingModel
from kdflow.steps.evaluate import speedup
from tests.helpers.servers import LOOPBACK, Server, _http_ok, free_port

CLASSES = [f"digit-{i}" for i in range(10)]


def served_model(width: int = 4, seed: int = 0) -> nn.Module:
    """A registered-form model (normaliser + small CNN) with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = zoo.build("cnn", 1, 10, width=width)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return ServingModel(Normalizer([0.3], [0.25]), net).eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = served_model()
    path = deploy.export_onnx(model, images(4).float(), tmp_path_factory.mktemp("onnx") / "m.onnx")
    return model, path


def test_the_export_matches_pytorch_at_every_batch_size(exported):
    model, path = exported
    sess = deploy.session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == (deploy.INPUT, "tensor(float)", [1, 8, 8])
    assert isinstance(inp.shape[0], str) and out.name == deploy.OUTPUT  # the batch axis is dynamic
    for n in (1, 3, 64):
        x = images(n, seed=n)
        with torch.no_grad():
            want = model(x.float())
        got = deploy.run(sess, x)
        assert got.shape == (n, 10)
        p = deploy.parity(want, got)
        assert p.max_abs_diff < 1e-4 and p.top1_agreement == 1.0
        deploy.check_parity("m", p, 1e-4, n)  # passes: no error


def test_parity_is_the_largest_logit_difference_and_the_top1_share():
    ref = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 0.0]])
    out = ref.clone()
    out[1, 1] = 3.5  # top-1 moves from 0 to 1 on the second image, |diff| 3.5
    out[2, 2] = 0.75  # top-1 stays, |diff| 0.25
    p = deploy.parity(ref, out)
    assert (p.max_abs_diff, p.top1_agreement) == (3.5, 0.75)
    assert p.metrics() == {"onnx_max_abs_diff": 3.5, "onnx_top1_agreement": 0.75}


def test_a_mismatching_export_fails_naming_the_model_and_the_numbers(exported):
    model, path = exported
    x = images(20)
    broken = served_model()
    with torch.no_grad():
        broken[1].classifier.bias += torch.arange(10.0)  # another model than the exported one
        want = broken(x.float())
    p = deploy.parity(want, deploy.run(deploy.session(path), x))
    assert p.max_abs_diff > 1.0
    disagree = round((1 - p.top1_agreement) * 20)
    with pytest.raises(ModelError) as err:
        deploy.check_parity("cnn4-kd", p, 1e-3, 20)
    assert str(err.value) == (
        "ONNX export of cnn4-kd does not match PyTorch on the target test split: max |logit difference| "
        f"{p.max_abs_diff:.3g} (export.parity_atol 0.001), top-1 differs on {disagree} of 20 images"
    )
    # one flipped top-1 fails even within the logit tolerance
    with pytest.raises(ModelError, match="top-1 differs on 1 of 4 images"):
        deploy.check_parity("m", deploy.Parity(1e-6, 0.75), 1e-3, 4)


def test_int8_quantization_keeps_the_head_fp32_and_agrees_with_fp32(exported, tmp_path):
    _, path = exported
    calibration = deploy.calibration_set(images(300), 128, seed=0)
    int8 = deploy.quantize_int8(path, calibration, tmp_path / "m8.onnx")
    graph = onnx.load(str(int8)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops[-1] == "Gemm"  # quantized convolutions, FP32 classifier
    conv_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(conv_weights) == 4  # the four convolutions' weights (BatchNorm folded into them), int8
    assert not (tmp_path / "m8.pre.onnx").exists()  # the pre-processed intermediate is removed
    x = images(200, seed=7)
    fp32_logits = deploy.run(deploy.session(path), x)
    int8_logits = deploy.run(deploy.session(int8), x)
    assert deploy.parity(fp32_logits, int8_logits).top1_agreement >= 0.9
    assert int8.stat().st_size < path.stat().st_size


def test_the_calibration_set_is_a_seeded_draw_and_its_hash_names_its_content():
    x = images(50)
    a, b = deploy.calibration_set(x, 20, seed=3), deploy.calibration_set(x, 20, seed=3)
    assert torch.equal(a, b) and len(a) == 20
    assert not torch.equal(a, deploy.calibration_set(x, 20, seed=4))
    assert len(deploy.calibration_set(x, 500, seed=3)) == 50  # all of them when fewer
    assert deploy.data_hash(a) == deploy.data_hash(a.clone())
    changed = a.clone()
    changed[0, 0, 0, 0] ^= 1
    assert deploy.data_hash(changed) != deploy.data_hash(a)


def test_timed_gives_the_median_and_interquartile_range_after_warm_up(monkeypatch):
    # warm-up calls read no clock; then timed calls of 1, 4, 2, 3 and 10 ms
    ticks = iter([0.0, 0.001, 1.0, 1.004, 2.0, 2.002, 3.0, 3.003, 4.0, 4.010])
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: next(ticks))
    calls = []
    median, iqr = evaluate.timed(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7
    assert median == pytest.approx(3.0)
    assert iqr == pytest.approx(4.0 - 2.0)  # numpy's linear quartiles of [1, 2, 3, 4, 10]


def test_onnx_runtime_latency_is_reported_per_batch_size_with_its_spread(exported):
    _, path = exported
    out = deploy.ort_profile(path, images(8), [1, 64], warmup=1, repeats=3, threads=1)
    cpu = {f"ort_{k}_b{b}" for k in ("latency_ms", "latency_iqr_ms") for b in (1, 64)}
    assert cpu <= set(out) and out["onnx_size_bytes"] == path.stat().st_size
    assert out["ort_latency_ms_b64"] > out["ort_latency_ms_b1"] > 0
    assert set(out) - cpu - {"onnx_size_bytes"} == (
        {f"ort_cuda_{k}_b{b}" for k in ("latency_ms", "latency_iqr_ms") for b in (1, 64)}
        if "CUDAExecutionProvider" in deploy.providers()
        else set()
    )


# ---------------------------------------------------------------------------------------- is it really faster


def test_the_speedup_is_measured_against_the_mac_ratio_and_flagged_below_the_share():
    cfg = load_config(None, {})  # min_speedup_share 0.5, speed-up at batch 64
    teacher = {"macs": 1000.0, "latency_ms_b64": 9.0}
    teacher_ort = {"ort_latency_ms_b1": 0.6, "ort_latency_ms_b64": 8.0}
    fast = {"macs": 250.0, "ort_latency_ms_b1": 0.3, "ort_latency_ms_b64": 4.0}  # 2x faster, 4x fewer MACs
    out = speedup(fast, teacher, teacher_ort, cfg)
    assert out == {
        "mac_ratio": 4.0,
        "ort_speedup_b1": 2.0,
        "ort_speedup_b64": 2.0,
        "speedup": 2.0,
        "speedup_share": 0.5,
        "speedup_flagged": 0.0,  # exactly the share: not below it
    }
    slow = {"macs": 250.0, "ort_latency_ms_b1": 0.5, "ort_latency_ms_b64": 5.0}
    assert speedup(slow, teacher, teacher_ort, cfg)["speedup_share"] == pytest.approx(0.4)
    assert speedup(slow, teacher, teacher_ort, cfg)["speedup_flagged"] == 1.0
    same_size = {"macs": 1000.0, "ort_latency_ms_b1": 0.9, "ort_latency_ms_b64": 10.0}  # not smaller: not flagged
    assert speedup(same_size, teacher, teacher_ort, cfg)["speedup_flagged"] == 0.0
    # without an ONNX export: PyTorch eager at batch 64, against the teacher step's timing
    eager = {"macs": 500.0, "latency_ms_b64": 3.0}
    assert speedup(eager, teacher, {}, cfg) == {
        "mac_ratio": 2.0,
        "speedup": 3.0,
        "speedup_share": 1.5,
        "speedup_flagged": 0.0,
    }
    at_b1 = load_config(None, {"evaluate.speedup_batch": 1, "evaluate.min_speedup_share": 0.9})
    assert speedup(fast, teacher, teacher_ort, at_b1)["speedup"] == 2.0
    assert speedup(fast, teacher, teacher_ort, at_b1)["speedup_flagged"] == 1.0  # 0.5 < 0.9


def test_the_speedup_batch_must_be_one_that_is_timed():
    from kdflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"evaluate.speedup_batch=32 is not one of .*\[1, 64\]"):
        load_config(None, {"evaluate.speedup_batch": 32})
    with pytest.raises(ConfigError, match="quantize.enabled needs export.onnx"):
        load_config(None, {"quantize.enabled": True, "export.onnx": False})


# -------------------------------------------------------------------------------------------------- serving


@pytest.mark.slow  # a real server process: about 20 s
def test_mlflow_models_serve_answers_with_the_onnx_models_logits_and_its_class_names(exported, tmp_path):
    import mlflow
    from mlflow.models import get_model_info

    _, path = exported
    deploy.set_classes(path, CLASSES)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.connect(uri)
    exp = tracking.ensure_experiment("serve-onnx", uri)
    with mlflow.start_run(experiment_id=exp):
        model_uri = tracking.log_onnx_model(path, images(4).float(), CLASSES)
    info = get_model_info(model_uri)
    assert info.metadata == {"classes": CLASSES} and "onnx" in info.flavors
    assert info.signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 1, 8, 8)}
    mv = mlflow.register_model(model_uri, "serve-onnx-student")
    tracking.client().set_registered_model_alias("serve-onnx-student", "champion", mv.version)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/serve-onnx-student@champion"]
    cmd += ["--env-manager", "local", "-h", LOOPBACK, "-p", str(port), "-w", "1"]
    server = Server("mlflow models serve", cmd, tmp_path / "serve.log", env=env)
    try:
        server.wait_until(lambda: _http_ok(f"http://{LOOPBACK}:{port}/ping"), 120, "answering /ping")
        x = images(3, seed=11)
        body = json.dumps({"inputs": x.float().tolist()}).encode()
        req = urllib.request.Request(
            f"http://{LOOPBACK}:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
    finally:
        server.stop()
    logits = np.asarray(answer["predictions"][deploy.OUTPUT])
    want = deploy.run(deploy.session(path), x).numpy()
    assert logits.shape == (3, 10)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    served_classes = get_model_info("models:/serve-onnx-student@champion").metadata["classes"]  # what was served
    assert [served_classes[i] for i in logits.argmax(1)] == [CLASSES[i] for i in want.argmax(1)]
    assert json.loads(onnx.load(str(path)).metadata_props[0].value) == CLASSES  # in the ONNX file itself too


def test_the_final_table_shows_onnx_runtime_latency_and_flags_a_candidate_not_really_faster(monkeypatch):
    import io

    from rich.console import Console

    from kdflow import cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=220))
    row = {"params": 1000, "macs": 250_000, "latency_ms_b1": 0.5, "teacher_agreement": 0.99, "mac_ratio": 4.0}
    summary = {
        "model_name": "m",
        "teacher": {
            "val_top1": 0.9,
            "test_top1": 0.91,
            "params": 9000,
            "macs": 1_000_000,
            "latency_ms_b1": 0.7,
            "ort_latency_ms_b1": 0.4321,
            "version": 1,
        },  # fmt: skip
        "candidates": {
            "s-kd": {
                **row,
                "val_top1": 0.95,
                "test_top1": 0.9,
                "version": 1,
                "ort_latency_ms_b1": 0.1234,
                "speedup": 3.14,
                "speedup_flagged": 0.0,
            },  # fmt: skip
            "s-kd-int8": {
                **row,
                "val_top1": 0.94,
                "test_top1": 0.89,
                "version": 2,
                "ort_latency_ms_b1": 0.0987,
                "speedup": 1.5,
                "speedup_flagged": 1.0,
            },  # fmt: skip
        },
        "decision": {"champion_version": 1, "selected": "s-kd", "rejected": {}, "promoted": True, "reason": "r"},
        "speedup": {"runtime": "onnxruntime", "batch": 64, "threads": 1, "min_share": 0.5},
    }
    cli._print_summary(summary)
    lines = out.getvalue().splitlines()
    header = next(line for line in lines if "model" in line and "MACs" in line)
    assert "ORT ms @b1" in header and "speed-up / MACs" in header
    assert "0.4321"[:5] in next(line for line in lines if "│ teacher" in line)
    kd = next(line for line in lines if "│ s-kd " in line)
    int8 = next(line for line in lines if "│ s-kd-int8" in line)
    assert "0.123" in kd and "3.1x / 4.0x" in kd and "!" not in kd
    assert "0.099" in int8 and "1.5x / 4.0x !" in int8
    assert "measured in onnxruntime at batch 64 with 1 thread(s)" in out.getvalue()
