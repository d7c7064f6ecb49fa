"""What ships: a model exported to ONNX, checked against PyTorch, quantized to INT8 and timed in ONNX Runtime.

Export uses torch's dynamo-based exporter (`torch.onnx.export(..., dynamo=True)`) on the registered form of a
model (normalisation + network: raw float32 pixels in [0, 255] → logits), with the batch axis dynamic.

INT8 is ONNX Runtime's post-training static quantization (QDQ format, int8 weights, uint8 activations),
calibrated on target training images. ONNX Runtime rather than PyTorch's PT2E: the model that ships is the ONNX
model and ONNX Runtime runs it, so its quantizer's choices (which ops it has int8 kernels for, Conv+BatchNorm
folded first by `quant_pre_process`) are the ones that make the shipped model fast; a PT2E model would still
have to be exported and would be timed in a runtime it does not ship in.

No MLflow here (`kdflow.tracking` logs the files); no config object either, so benchmarks call it directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdflow.errors import ModelError

INPUT, OUTPUT = "pixels", "logits"  # the ONNX graph's input and output names
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 18) -> Path:
    """`model` (raw pixels in, logits out) as an ONNX file at `path`, batch axis dynamic. `example`: a float
    batch of 2 or more (a batch of 1 lets the exporter specialise the batch axis)."""
    model = model.to("cpu").eval()
    example = example.to("cpu").float()
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:  # the exporter prints its progress to stdout: kept out of the step's log
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                input_names=[INPUT],
                output_names=[OUTPUT],
                opset_version=opset,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


def session(path: str | Path, threads: int = 1, provider: str = CPU):
    """An ONNX Runtime session on `path` with `threads` intra-op threads (and one inter-op thread), all graph
    optimisations on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=[provider])


def providers() -> list[str]:
    """The ONNX Runtime execution providers of this install that kdflow times (CPU; CUDA with onnxruntime-gpu)."""
    import onnxruntime as ort

    usable = [CPU] + ([CUDA] if torch.cuda.is_available() else [])
    return [p for p in usable if p in ort.get_available_providers()]


def run(sess, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, K) of an ONNX model for uint8 (or raw float) images (N, C, H, W)."""
    out = [sess.run([OUTPUT], {INPUT: x[i : i + batch_size].float().numpy()})[0] for i in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(out))


@dataclass
class Parity:
    max_abs_diff: float  # over every logit of every image
    top1_agreement: float  # share of images whose ONNX top-1 is PyTorch's

    def metrics(self, prefix: str = "onnx_") -> dict[str, float]:
        return {f"{prefix}max_abs_diff": self.max_abs_diff, f"{prefix}top1_agreement": self.top1_agreement}


def parity(reference: torch.Tensor, exported: torch.Tensor) -> Parity:
    """How far an exported model's logits are from the PyTorch model's on the same images."""
    diff = float((reference.float() - exported.float()).abs().max())
    agree = float((reference.argmax(1) == exported.argmax(1)).float().mean())
    return Parity(diff, agree)


def check_parity(name: str, p: Parity, atol: float, images: int) -> None:
    """Fail, naming the model and the numbers, when its ONNX export is not the PyTorch model: a logit further
    than `atol` away or a different top-1 on any of the `images` test images."""
    if p.max_abs_diff > atol or p.top1_agreement < 1.0:
        disagree = round((1.0 - p.top1_agreement) * images)
        raise ModelError(
            f"ONNX export of {name} does not match PyTorch on the target test split: max |logit difference| "
            f"{p.max_abs_diff:.3g} (export.parity_atol {atol:g}), top-1 differs on {disagree} of {images} images"
        )


def calibration_set(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded draw of `n` images (all when fewer) from the target training split, in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[: min(n, len(x))]
    return x[idx.sort().values]


def data_hash(x: torch.Tensor) -> str:
    """SHA-256 of images' shape and bytes: the calibration set's identity in the lineage."""
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def quantize_int8(
    fp32: str | Path, calibration: torch.Tensor, out: str | Path, method: str = "minmax", per_channel: bool = False
) -> Path:
    """ONNX Runtime static INT8 quantization of `fp32` (QDQ; int8 weights, one scale per tensor or per output
    channel, uint8 activations), calibrated on
    `calibration` (raw images, fed in batches of 64). Conv+BatchNorm are folded and shapes inferred first. The
    classifier head stays FP32 (`classifier_head`): a tiny share of the work, and uint8 logits would tie."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i : i + 64].float().numpy() for i in range(0, len(calibration), 64))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    out = Path(out)
    pre = out.with_name(out.stem + ".pre.onnx")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    quant_pre_process(str(fp32), str(pre))
    head = classifier_head(pre)
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        calibrate_method=methods[method],
        nodes_to_exclude=head,
    )
    pre.unlink(missing_ok=True)
    return out


def classifier_head(path: str | Path) -> list[str]:
    """The names of the nodes that compute the logits from the last features: the linear layer (Gemm, or MatMul
    then Add) that produces the graph's output."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {out: n for n in graph.node for out in n.output}
    head, name = [], graph.output[0].name
    while name in producer and producer[name].op_type in ("Gemm", "MatMul", "Add") and len(head) < 2:
        node = producer[name]
        head.append(node.name)
        if node.op_type != "Add":
            break
        name = node.input[0]
    return head


def set_classes(path: str | Path, classes: list[str]) -> None:
    """Record the class names (in logit order) in the ONNX file's metadata (`classes`, JSON)."""
    import json

    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "classes", json.dumps(classes)
    onnx.save(model, str(path))


def ort_latency_ms(sess, example: torch.Tensor, batch_size: int, warmup: int, repeats: int) -> tuple[float, float]:
    """(median, IQR) in milliseconds of one ONNX Runtime run at `batch_size` (the session's threads: `session`)."""
    from kdflow.evaluate import timed

    x = example[:1].float().expand(batch_size, *example.shape[1:]).contiguous().numpy()
    return timed(lambda: sess.run([OUTPUT], {INPUT: x}), warmup, repeats)


def ort_profile(
    path: str | Path, example: torch.Tensor, batch_sizes: list[int], warmup: int, repeats: int, threads: int
) -> dict[str, float]:
    """ONNX Runtime latency of the model at `path` at each batch size, on every provider this install has:
    `ort_latency_ms_b<b>` / `ort_latency_iqr_ms_b<b>` on the CPU with `threads` intra-op threads,
    `ort_cuda_latency_ms_b<b>` / `ort_cuda_latency_iqr_ms_b<b>` with onnxruntime-gpu on a GPU node; and the
    file's size (`onnx_size_bytes`)."""
    out = {"onnx_size_bytes": float(Path(path).stat().st_size)}
    for provider in providers():
        key = "ort_" if provider == CPU else "ort_cuda_"
        sess = session(path, threads, provider)
        for b in batch_sizes:
            median, iqr = ort_latency_ms(sess, example, b, warmup, repeats)
            out[f"{key}latency_ms_b{b}"], out[f"{key}latency_iqr_ms_b{b}"] = median, iqr
    return out
