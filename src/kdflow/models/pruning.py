"""Structured channel pruning with Torch-Pruning: whole channels leave the network, so it really shrinks.

Torch-Pruning traces the dependency graph (a conv's output channels, the next BN, the next conv's input
channels, residual additions) and removes coupled channels together. The classifier's outputs are kept. The
result is saved like any other model (`kdflow.models.checkpoint`): layer shapes as JSON, tensors weights-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from kdflow.models import zoo as models

IMPORTANCE = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "random": lambda: tp.importance.RandomImportance(),
}


@dataclass
class PruneReport:
    ratio: float
    importance: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def param_reduction(self) -> float:
        return self.params_before / self.params_after

    @property
    def mac_reduction(self) -> float:
        return self.macs_before / self.macs_after


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def prune(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    arch: str,
    importance: str = "l2",
    global_pruning: bool = False,
    round_to: int | None = None,
    calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PruneReport:
    """Remove `ratio` of the channels of every prunable layer of `model` (in place; the head's outputs stay).

    `example` is one normalised input batch (N, C, H, W) for tracing. `calibration` batches (normalised
    inputs, labels) feed the gradient for the Taylor criterion. A layer with C channels keeps int(C·(1−ratio)),
    rounded down to a multiple of `round_to` when that is set (so `round_to` can prune more than `ratio`).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"prune ratio must be in (0, 1), got {ratio}")
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; known: {', '.join(IMPORTANCE)}")
    model.eval()
    macs0, params0 = count_macs_params(model, example)
    head = model.get_submodule(models.MODELS[arch].head) if arch in models.MODELS else None
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=IMPORTANCE[importance](),
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        round_to=round_to,
        ignored_layers=[head] if head is not None else [],
    )
    if importance == "taylor":
        if not calibration:
            raise ValueError("the taylor importance needs calibration batches (inputs, labels)")
        model.zero_grad()
        for xb, yb in calibration:
            F.cross_entropy(model(xb), yb).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    macs1, params1 = count_macs_params(model, example)
    if params1 >= params0:
        raise ValueError(
            f"pruning at ratio {ratio} (round_to={round_to}) removed nothing: every layer kept all its channels"
        )
    return PruneReport(ratio, importance, params0, params1, macs0, macs1)
