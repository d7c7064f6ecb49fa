"""Training objectives: the loss math as small pure functions, and one class per objective kind.

Each objective kind is one class registered under its config `kind` (`@register("kd")`); `build(cfg)` picks
the class for a `LossConfig`, and an unknown kind is refused with the list of valid ones. A class says what
it needs from a training step, so the loop asks it instead of testing names:

- `needs_teacher`: a distillation term computed from the teacher's outputs on the transfer set;
- `needs_features`: the student's and the teacher's hint-layer features as well (the loop taps them);
- `make_adapter`: a trained module that maps student features to the teacher's (FitNets), or None.

All functions take raw logits (never softmax outputs: `F.cross_entropy` applies log-softmax itself, and a
softmax in front of it silently flattens the gradients). Shapes: logits (B, K), labels (B,), features
(B, C, H, W).

Adding an objective: one class here with its formula and paper in the docstring, its kind added to
`kdflow.config.OBJECTIVE_KINDS` (a test keeps the two equal), and a test against hand-computed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.config import Candidate, Config, LossConfig
from kdflow.errors import ConfigError

# ------------------------------------------------------------------------------------------- the loss math


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


class HintAdapter(nn.Module):
    """The FitNets regressor: a 1×1 conv from the student's channels to the teacher's, with spatial sizes
    matched by adaptive average pooling. Trained with the student, discarded afterwards."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student_features: torch.Tensor, teacher_hw: tuple[int, int]) -> torch.Tensor:
        x = self.proj(student_features)
        return x if x.shape[-2:] == teacher_hw else F.adaptive_avg_pool2d(x, teacher_hw)


# ------------------------------------------------------------------------------------------- the objectives


@dataclass
class Outputs:
    """What one training step hands an objective. The transfer set is the target batch, the source batch or
    both (`LossConfig.transfer`); the loop has already cut every transfer tensor to it."""

    logits: torch.Tensor  # (B, K): the student on the labelled target images
    labels: torch.Tensor  # (B,)
    student: torch.Tensor | None = None  # (B', K): the student on the transfer set
    teacher: torch.Tensor | None = None  # (B', K): the teacher on the transfer set
    student_features: torch.Tensor | None = None  # (B', C, H, W): the student's hint layer (needs_features)
    teacher_features: torch.Tensor | None = None  # (B', C', H', W'): the teacher's hint layer


Parts = dict[str, torch.Tensor]


class Objective:
    """One training objective, configured by a `LossConfig`. Calling it returns (loss, its named parts,
    detached, for logging: tensors, so summing them per step needs no device sync)."""

    kind: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    @property
    def uses_source_data(self) -> bool:
        """The distillation term's transfer set includes source-task images (`transfer: source | both`)."""
        return self.needs_teacher and self.cfg.transfer != "target"

    def make_adapter(self, student_channels: int, teacher_channels: int) -> nn.Module | None:
        """A module trained with the student to map its features to the teacher's; None without features."""
        return None

    def __call__(self, out: Outputs, adapter: nn.Module | None = None) -> tuple[torch.Tensor, Parts]:
        loss, parts = self.loss(out, adapter)
        return loss, {k: v.detach() for k, v in parts.items()}

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        raise NotImplementedError


OBJECTIVES: dict[str, type[Objective]] = {}


def register(kind: str):
    """Class decorator: make `cls` the objective for config `kind`."""

    def add(cls: type[Objective]) -> type[Objective]:
        if kind in OBJECTIVES:
            raise ValueError(f"objective kind {kind!r} is registered twice")
        cls.kind = kind
        OBJECTIVES[kind] = cls
        return cls

    return add


def build(cfg: LossConfig) -> Objective:
    """The objective a `LossConfig` describes; an unknown kind names the valid ones."""
    try:
        cls = OBJECTIVES[cfg.kind]
    except KeyError:
        valid = ", ".join(sorted(OBJECTIVES))
        raise ConfigError(f"unknown objective kind {cfg.kind!r}; valid kinds: {valid}") from None
    return cls(cfg)


@register("ce")
class CrossEntropy(Objective):
    """L_CE: the student alone on the hard labels, the no-teacher baseline."""

    needs_teacher = False

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        ce = cross_entropy(out.logits, out.labels)
        return ce, {"ce": ce}


@register("kd")
class HintonKD(Objective):
    """(1 − α)·L_CE + α·T²·KL(softmax(z_T/T) ‖ softmax(z_S/T)) (Hinton et al. 2015); α = 0 is plain CE."""

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        ce = cross_entropy(out.logits, out.labels)
        kd = kd_kl(out.student, out.teacher, self.cfg.temperature)
        return (1 - self.cfg.alpha) * ce + self.cfg.alpha * kd, {"ce": ce, "kd": kd}


@register("logit_mse")
class LogitMSE(Objective):
    """L_CE + λ·‖f_T(x) − f_S(x)‖² (Ba & Caruana 2014): raw-logit matching on the transfer set."""

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        ce = cross_entropy(out.logits, out.labels)
        mse = logit_mse(out.student, out.teacher)
        return ce + self.cfg.lam * mse, {"ce": ce, "logit_mse": mse}


@register("hint")
class FitNetsHint(HintonKD):
    """(1 − α)·L_CE + α·T²·KL + β·‖r(F_S) − F_T‖² (FitNets, Romero et al. 2015): Hinton KD plus a feature
    hint, the student's guided layer mapped to the teacher's hint layer by a learned 1×1 regressor r."""

    needs_features = True

    def make_adapter(self, student_channels: int, teacher_channels: int) -> nn.Module:
        return HintAdapter(student_channels, teacher_channels)

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        adapted = adapter(out.student_features, out.teacher_features.shape[-2:])  # (B', C', H', W')
        loss, parts = super().loss(out, adapter)
        hint = feature_hint(adapted, out.teacher_features)
        return loss + self.cfg.beta * hint, {**parts, "hint": hint}


# ------------------------------------------------------------------------------------- grouping candidates


def candidate_groups(cfg: Config) -> list[str]:
    """The distill steps' work: candidate names joined by "," in groups of `distill.candidates_per_step`, those
    whose transfer sets use source images grouped apart (one data stream per step). With random augmentation
    objectives that need features are grouped apart too: they need the teacher's features on every batch,
    while the others look its logits up in the teacher step's crop table (`kdflow.engine.teacher_outputs`),
    which one hint candidate in their step would make them give up."""
    k = cfg.distill.candidates_per_step
    augmenting = cfg.distill.train.augment != "none"

    def stream(c: Candidate) -> tuple[bool, bool]:
        obj = build(c.loss)
        return obj.uses_source_data, augmenting and obj.needs_features

    groups: list[list[str]] = []
    for key in ((False, False), (False, True), (True, False), (True, True)):
        names = [c.name for c in cfg.candidates() if stream(c) == key]
        groups += [names[i : i + k] for i in range(0, len(names), k)]
    return [",".join(g) for g in groups]
