"""Distillation losses: small pure functions selected by name, and the objectives built from them.

All functions take raw logits (never softmax outputs: `F.cross_entropy` applies log-softmax itself, and a
softmax in front of it silently flattens the gradients). Shapes: logits (B, K), labels (B,), features
(B, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.config import LossConfig


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with the hard labels: the supervised term `L_target`."""
    return F.cross_entropy(student_logits, labels)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    T² · KL(softmax(z_T / T) ‖ softmax(z_S / T)), averaged over the batch. The T² factor keeps the gradient
    magnitude of the soft term comparable across temperatures (soft gradients scale as 1/T²).
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Logit matching (Ba & Caruana 2014; the `λ·‖f_T(x) − f_S(x)‖²` term): squared L2 distance between
    the logit vectors, summed over classes and averaged over the batch."""
    return (teacher_logits - student_logits).pow(2).sum(dim=1).mean()


def feature_hint(adapted_student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint (Romero et al. 2015): mean squared error between the teacher's hint-layer output and the
    student's guided-layer output after a learned regressor (`HintAdapter`) maps it to the teacher's shape."""
    return F.mse_loss(adapted_student_features, teacher_features)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": cross_entropy,
    "kd_kl": kd_kl,
    "logit_mse": logit_mse,
    "feature_hint": feature_hint,
}


class HintAdapter(nn.Module):
    """The FitNets regressor: a 1×1 conv from the student's channels to the teacher's, with spatial sizes
    matched by adaptive average pooling. Trained with the student, discarded afterwards."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student_features: torch.Tensor, teacher_hw: tuple[int, int]) -> torch.Tensor:
        x = self.proj(student_features)
        return x if x.shape[-2:] == teacher_hw else F.adaptive_avg_pool2d(x, teacher_hw)


def objective(
    cfg: LossConfig,
    logits: torch.Tensor,
    labels: torch.Tensor,
    transfer_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    adapted_features: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training objective from a LossConfig: returns (loss, its named parts, detached, for logging).

    - ce:        L_CE
    - kd:        (1 − α)·L_CE + α·T²·KL           (α = 0 → plain cross-entropy)
    - logit_mse: L_CE + λ·‖f_T − f_S‖²
    - hint:      (1 − α)·L_CE + α·T²·KL + β·L_hint
    `logits`/`labels` are the student on labelled target data; `transfer_logits`/`teacher_logits` are student
    and teacher on the transfer set (target, source or both), which the distillation terms use.
    """
    ce = cross_entropy(logits, labels)
    parts = {"ce": ce}
    if cfg.kind == "ce":
        loss = ce
    elif cfg.kind in ("kd", "hint"):
        kd = kd_kl(transfer_logits, teacher_logits, cfg.temperature)
        loss = (1 - cfg.alpha) * ce + cfg.alpha * kd
        parts["kd"] = kd
        if cfg.kind == "hint":
            hint = feature_hint(adapted_features, teacher_features)
            loss = loss + cfg.beta * hint
            parts["hint"] = hint
    elif cfg.kind == "logit_mse":
        mse = logit_mse(transfer_logits, teacher_logits)
        loss = ce + cfg.lam * mse
        parts["logit_mse"] = mse
    else:  # pragma: no cover - LossConfig.kind is a closed Literal
        raise ValueError(f"unknown loss kind {cfg.kind!r}")
    return loss, {k: v.detach() for k, v in parts.items()}  # tensors: summing them needs no device sync


def needs_teacher(cfg: LossConfig) -> bool:
    """Every objective but plain cross-entropy has a distillation term (defined on LossConfig)."""
    return cfg.needs_teacher


def uses_source_data(cfg: LossConfig) -> bool:
    """The transfer set includes source-task images, `transfer: source | both` (defined on LossConfig)."""
    return cfg.uses_source_data
