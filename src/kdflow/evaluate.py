"""What a student is worth: accuracy, calibration, agreement with its teacher, size, FLOPs and CPU latency.

Latency is measured on the CPU (where small models are served) at fixed batch sizes: warm-up runs first,
then the median of repeated timed runs, so one slow run (a page fault, a scheduler hiccup) does not count.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdflow.config import EvalConfig
from kdflow.models.zoo import count_params


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, normalizer: nn.Module, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, K) for uint8 images, in eval mode, on the model's device; returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    normalizer = normalizer.to(device)
    out = [model(normalizer(x[i : i + batch_size].to(device))).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Share of rows whose label is among the k largest logits (labels on any device)."""
    topk = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
    return float((topk == y.to(logits.device)[:, None]).any(dim=1).float().mean())


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return topk_accuracy(logits, y, 1)


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    flat = y * num_classes + pred
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes).numpy()


def per_class_accuracy(cm: np.ndarray) -> list[float]:
    totals = cm.sum(axis=1)
    return [float(cm[i, i] / totals[i]) if totals[i] else float("nan") for i in range(len(cm))]


def expected_calibration_error(logits: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): |accuracy − confidence| per equal-width confidence bin, weighted by bin size."""
    probs = F.softmax(logits.float(), dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += float(mask.float().mean() * (correct[mask].mean() - conf[mask].mean()).abs())
    return ece


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of inputs on which student and teacher predict the same class."""
    return float((student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean())


def flops(model: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs of one input (multiply-adds count as 2), by torch's own op-level counter."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example[:1])
    return int(counter.get_total_flops())


def timed(fn, warmup: int, repeats: int) -> tuple[float, float]:
    """(median, interquartile range) in milliseconds of `repeats` timed calls of `fn` after `warmup` untimed
    ones; the median so that one slow run (a page fault, a scheduler hiccup) does not count."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return float(median), float(q3 - q1)


def latency_ms(
    model: nn.Module,
    example: torch.Tensor,
    batch_size: int,
    warmup: int,
    repeats: int,
    threads: int = 1,
    device: str = "cpu",
) -> tuple[float, float]:
    """(median, IQR) wall time in milliseconds of one PyTorch eager forward pass at `batch_size` on `device`
    with `threads` intra-op threads (on CUDA each pass is synchronised). A fixed thread count keeps numbers
    comparable between runs and unaffected by other processes' threads (local pipeline steps run side by
    side)."""
    model = model.to(device).eval()
    x = example[:1].to(device).expand(batch_size, *example.shape[1:]).contiguous()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def forward():
        model(x)
        sync()

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return timed(forward, warmup, repeats)
    finally:
        torch.set_num_threads(previous)
        model.to("cpu")


def cpu_latency_ms(
    model: nn.Module, example: torch.Tensor, batch_size: int, warmup: int, repeats: int, threads: int = 1
) -> float:
    """Median wall time in milliseconds of one forward pass at `batch_size` on the CPU (`latency_ms`)."""
    return latency_ms(model, example, batch_size, warmup, repeats, threads)[0]


def profile(model: nn.Module, example: torch.Tensor, size_bytes: int, cfg: EvalConfig) -> dict:
    """Size and speed of a model in PyTorch eager: params, serialized bytes, FLOPs/MACs per image, and latency at
    each of `cfg.latency_batch_sizes` (ms: `latency_ms_b<b>` the median of the timed runs on the CPU,
    `latency_iqr_ms_b<b>` their interquartile range; `cuda_latency_ms_b<b>` too where CUDA is available).
    `example` is a normalised input batch."""
    model = model.cpu().eval()
    example = example.cpu()
    out = {"params": count_params(model), "size_bytes": size_bytes}
    out["flops"] = flops(model, example)
    out["macs"] = out["flops"] // 2
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        key = "" if device == "cpu" else f"{device}_"
        for b in cfg.latency_batch_sizes:
            median, iqr = latency_ms(
                model, example, b, cfg.latency_warmup, cfg.latency_repeats, cfg.latency_threads, device
            )
            out[f"{key}latency_ms_b{b}"], out[f"{key}latency_iqr_ms_b{b}"] = median, iqr
    return out


def classification_report(
    logits: torch.Tensor, y: torch.Tensor, num_classes: int, ece_bins: int = 15, prefix: str = "test"
) -> tuple[dict[str, float], np.ndarray]:
    """Top-1 (and top-5 with more than 5 classes), loss, ECE, per-class accuracy (of the classes present in the
    split); plus the confusion matrix."""
    cm = confusion_matrix(logits.argmax(1), y, num_classes)
    m = {
        f"{prefix}_top1": topk_accuracy(logits, y, 1),
        f"{prefix}_loss": float(F.cross_entropy(logits, y)),
        f"{prefix}_ece": expected_calibration_error(logits, y, ece_bins),
    }
    if num_classes > 5:
        m[f"{prefix}_top5"] = topk_accuracy(logits, y, 5)
    for i, acc in enumerate(per_class_accuracy(cm)):
        if not math.isnan(acc):  # a class absent from the split has no accuracy (and KFP metrics refuse NaN)
            m[f"{prefix}_class_{i}_acc"] = acc
    return m, cm


def confusion_figure(cm: np.ndarray, classes: list[str], title: str):
    """A matplotlib figure of the confusion matrix, counts in the non-empty cells (empty ones stay blank: easier
    to read, and a tenth of the text to lay out for a good model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    # layout="tight" lays out while saving: tight_layout() would draw the whole figure once more first
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.8 + 0.45 * n), layout="tight")
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 20:
        for i, j in zip(*np.nonzero(cm)):
            ax.text(
                j,
                i,
                int(cm[i, j]),
                ha="center",
                va="center",
                fontsize=6,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    return fig
