"""Training objectives: the loss math as small pure functions, and one class per objective kind.

Each objective kind is one class registered under its config `kind` (`@register("kd")`); `build(cfg)` picks
the class for a `LossConfig`, and an unknown kind is refused with the list of valid ones. A class says what
it needs from a training step, so the loop asks it instead of testing names:

- `needs_teacher`: a distillation term computed from the teacher's outputs on the transfer set;
- `needs_features`: the student's and the teacher's hint-layer features as well (the loop taps them);
- `make_adapter`: a trained module that maps student features to the teacher's (FitNets), or None;
- `needs_labelled_transfer`: the distillation term uses the labels of its transfer images (DKD), so only
  `transfer: target` will do;
- `standardizable`: `standardize: true` (logit standardization) applies to its distillation term.

All functions take raw logits (never softmax outputs: `F.cross_entropy` applies log-softmax itself, and a
softmax in front of it silently flattens the gradients). Shapes: logits (B, K), labels (B,), features
(B, C, H, W).

Adding an objective: one class here with its formula and paper in the docstring, its kind added to
`kdflow.config.OBJECTIVE_KINDS` (and to `STANDARDIZABLE_KINDS` / `LABELLED_TRANSFER_KINDS` with those flags: a test
keeps them equal), and a test against hand-computed values.
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


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun, Ren, Li, Wang & Cao, CVPR 2024, "Logit Standardization in Knowledge
    Distillation"): the z-score of each logit vector, `(z − mean(z)) / (std(z) + eps)` per sample, with the
    unbiased (n − 1) standard deviation and eps = 1e-7 as in the authors' code. The softened softmax of the
    result no longer depends on the logits' shift or (positive) scale, only on their relations, so a student
    need not match its teacher's logit range."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def _batch_kl(log_p_teacher: torch.Tensor, log_p_student: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) from log-probabilities over dim 1, averaged over the batch."""
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, "Decoupled Knowledge Distillation"): (TCKD, NCKD),
    each T²-scaled and averaged over the batch, as mdistiller's `dkd_loss`.

    With p = softmax(z / T) and y the label: TCKD = T²·KL(b_T ‖ b_S) over the binary target / non-target
    probabilities b = (p_y, 1 − p_y); NCKD = T²·KL(p̂_T ‖ p̂_S) over the non-target classes' renormalised
    probabilities p̂_k = p_k / (1 − p_y), k ≠ y, i.e. softmax(z_{k≠y} / T). Per sample, Hinton's KL splits as
    KL(p_T ‖ p_S) = TCKD + (1 − p_T,y)·NCKD (the paper's Eq. 6): DKD weighs the two parts freely. Computed in
    log space (b's non-target log-probability is a log-sum-exp, p̂ a softmax over the K − 1 other logits), so
    neither a log of a sum of probabilities nor a masked −1000 as in the reference is needed.
    """
    t = temperature
    label = labels[:, None]  # (B, 1)
    # the K − 1 other classes of each row, in order: k, or k + 1 from the label on (a gather: no device sync)
    rest = torch.arange(student_logits.shape[1] - 1, device=labels.device)[None, :]
    rest = rest + (rest >= label)  # (B, K − 1)

    def split(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = logits / t
        return scaled.gather(1, label), scaled.gather(1, rest)  # (B, 1), (B, K − 1)

    (s_y, s_rest), (t_y, t_rest) = split(student_logits), split(teacher_logits)

    def binary(y: torch.Tensor, others: torch.Tensor) -> torch.Tensor:  # (B, 2) log-probabilities of b
        return F.log_softmax(torch.cat([y, others.logsumexp(dim=1, keepdim=True)], dim=1), dim=1)

    tckd = _batch_kl(binary(t_y, t_rest), binary(s_y, s_rest)) * (t * t)
    nckd = _batch_kl(F.log_softmax(t_rest, dim=1), F.log_softmax(s_rest, dim=1)) * (t * t)
    return tckd, nckd


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of two (N, D) tensors: the cosine of the mean-centred rows, with eps added to
    the norms' product as in the DIST authors' code (a constant row correlates 0 with anything)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST (Huang, You, Wang, Qian & Xu, NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"):
    (inter, intra), each T²-scaled as in the authors' `DIST` loss.

    With Y = softmax(z / T) row-wise, (B, K): inter = T²·(1 − mean_i ρ(Y_S[i, :], Y_T[i, :])), the inter-class
    relation of each sample's prediction; intra = T²·(1 − mean_k ρ(Y_S[:, k], Y_T[:, k])), the intra-class
    relation of each class's scores across the batch; ρ is Pearson's correlation (`pearson`). Matching
    correlations instead of KL asks only for the teacher's ranking and relative spread, which the paper finds
    keeps working when the teacher is much stronger than the student. The intra term needs a batch of at least
    3 to say anything (2 points always correlate ±1; 1 correlates 0).
    """
    t = temperature
    p_s = F.softmax(student_logits / t, dim=1)
    p_t = F.softmax(teacher_logits / t, dim=1)
    inter = (1 - pearson(p_s, p_t).mean()) * (t * t)
    intra = (1 - pearson(p_s.T, p_t.T).mean()) * (t * t)
    return inter, intra


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
    needs_labelled_transfer: ClassVar[bool] = False
    standardizable: ClassVar[bool] = False
    # the `LossConfig` fields this kind's formula reads: what its run's params and lineage tags record
    settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: LossConfig):
        # `LossConfig` refuses both already; this catches a config that skipped validation (`model_construct`)
        if self.needs_labelled_transfer and cfg.transfer != "target":
            raise ConfigError(
                f"loss {cfg.name!r} of kind {self.kind!r} needs the labels of its transfer images, so transfer "
                f"must be 'target' (got transfer: {cfg.transfer!r})"
            )
        if cfg.standardize and not self.standardizable:
            raise ConfigError(f"standardize: true does not apply to loss {cfg.name!r} of kind {self.kind!r}")
        self.cfg = cfg

    def transfer_logits(self, out: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's transfer-set logits, z-scored (`standardize`) when configured."""
        if self.cfg.standardize:
            return standardize(out.student), standardize(out.teacher)
        return out.student, out.teacher

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


SETTING_TAGS = {"temperature": "kdflow.temperature", "alpha": "kdflow.alpha", "lam": "kdflow.lambda",
                "beta": "kdflow.beta", "gamma": "kdflow.gamma", "standardize": "kdflow.standardize",
                "transfer": "kdflow.transfer"}  # fmt: skip


def used_settings(cfg: LossConfig) -> dict[str, object]:
    """The settings of `cfg` its kind reads (`Objective.settings`): `ce` reads none of T, α, λ, β, γ."""
    return {k: getattr(cfg, k) for k in OBJECTIVES[cfg.kind].settings}


def setting_tags(cfg: LossConfig) -> dict[str, str]:
    """The lineage tags of `cfg`'s used settings (`kdflow.temperature`, `kdflow.alpha`, ...)."""
    return {SETTING_TAGS[k]: str(v) for k, v in used_settings(cfg).items()}


@register("ce")
class CrossEntropy(Objective):
    """L_CE: the student alone on the hard labels, the no-teacher baseline."""

    needs_teacher = False

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        ce = cross_entropy(out.logits, out.labels)
        return ce, {"ce": ce}


@register("kd")
class HintonKD(Objective):
    """(1 − α)·L_CE + α·T²·KL(softmax(z_T/T) ‖ softmax(z_S/T)) (Hinton et al. 2015); α = 0 is plain CE.

    With `standardize: true`, z_S and z_T are z-scored first (`standardize`, Sun et al. CVPR 2024), the CE term
    keeps the raw logits. The authors' CIFAR-100 setting for it is T = 2 with weights 0.1·CE + 9·KD; this convex
    mix can match their ratio (α = 90/91 ≈ 0.99) but not their overall scale (9.1×), which acts like a larger
    learning rate.
    """

    settings = ("temperature", "alpha", "standardize", "transfer")

    standardizable = True

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        ce = cross_entropy(out.logits, out.labels)
        kd = kd_kl(*self.transfer_logits(out), self.cfg.temperature)
        return (1 - self.cfg.alpha) * ce + self.cfg.alpha * kd, {"ce": ce, "kd": kd}


@register("logit_mse")
class LogitMSE(Objective):
    """L_CE + λ·‖f_T(x) − f_S(x)‖² (Ba & Caruana 2014): raw-logit matching on the transfer set."""

    settings = ("lam", "transfer")

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        ce = cross_entropy(out.logits, out.labels)
        mse = logit_mse(out.student, out.teacher)
        return ce + self.cfg.lam * mse, {"ce": ce, "logit_mse": mse}


@register("hint")
class FitNetsHint(HintonKD):
    """(1 − α)·L_CE + α·T²·KL + β·‖r(F_S) − F_T‖² (FitNets, Romero et al. 2015): Hinton KD plus a feature
    hint, the student's guided layer mapped to the teacher's hint layer by a learned 1×1 regressor r."""

    settings = ("temperature", "alpha", "beta", "transfer")

    needs_features = True
    standardizable = False

    def make_adapter(self, student_channels: int, teacher_channels: int) -> nn.Module:
        return HintAdapter(student_channels, teacher_channels)

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        adapted = adapter(out.student_features, out.teacher_features.shape[-2:])  # (B', C', H', W')
        loss, parts = super().loss(out, adapter)
        hint = feature_hint(adapted, out.teacher_features)
        return loss + self.cfg.beta * hint, {**parts, "hint": hint}


@register("dkd")
class DecoupledKD(Objective):
    """L_CE + α·TCKD + β·NCKD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation"; `dkd_terms`): KD split
    into its target-class part (TCKD: how sure of the label) and its non-target part (NCKD: how the wrong classes
    rank), the latter no longer damped by the teacher's confidence (1 − p_T,y) as inside Hinton's KL.

    Config: `alpha` weighs TCKD, `beta` NCKD, `temperature` is T. The reference (mdistiller) uses CE weight 1,
    α = 1, β = 8, T = 4 on CIFAR-100; `LossConfig`'s defaults (α 0.9, β 1) are other kinds', so a dkd config should
    set alpha and beta. The reference also ramps the DKD term up linearly over the first 20 epochs
    (`min(epoch / warmup, 1)`); an objective sees no epoch, so there is no warm-up here.

    Both terms need the label of every transfer image: only `transfer: target` (the labelled target batch).
    With `standardize: true` both sets of logits are z-scored before the terms (Sun et al. 2024), CE keeps the raw
    logits.
    """

    settings = ("temperature", "alpha", "beta", "standardize", "transfer")

    needs_labelled_transfer = True
    standardizable = True

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        ce = cross_entropy(out.logits, out.labels)
        tckd, nckd = dkd_terms(*self.transfer_logits(out), out.labels, self.cfg.temperature)
        total = ce + self.cfg.alpha * tckd + self.cfg.beta * nckd
        return total, {"ce": ce, "tckd": tckd, "nckd": nckd}


@register("dist")
class DIST(Objective):
    """L_CE + β·inter + γ·intra (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher";
    `dist_terms`): the student's softened predictions matched to the teacher's by Pearson correlation, per
    sample across classes (inter) and per class across the batch (intra), each T²-scaled.

    Config: `beta` weighs inter, `gamma` intra, `temperature` is T. The authors' code defaults to β = γ = 1,
    T = 1 (kd method `dist`, `dist_t<T>` for another T) with CE weight 1; LossConfig's temperature default (4)
    is other kinds', so a dist config should set it. The intra term correlates over the transfer batch, so
    it wants batches of many images (it is meaningless below 3).
    """

    settings = ("temperature", "beta", "gamma", "transfer")

    def loss(self, out: Outputs, adapter: nn.Module | None) -> tuple[torch.Tensor, Parts]:
        ce = cross_entropy(out.logits, out.labels)
        inter, intra = dist_terms(out.student, out.teacher, self.cfg.temperature)
        total = ce + self.cfg.beta * inter + self.cfg.gamma * intra
        return total, {"ce": ce, "inter": inter, "intra": intra}


# ------------------------------------------------------------------------------------- grouping candidates


def candidate_groups(cfg: Config) -> list[str]:
    """The distill steps' work: candidate names joined by "," in groups of `distill.candidates_per_step`, those
    whose transfer sets use source images grouped apart (one data stream per step). With random augmentation
    objectives that need features are grouped apart too: they need the teacher's features on every batch,
    while the others look its logits up in the teacher step's crop table (`kdflow.engine.teacher_outputs`),
    which one hint candidate in their step would make them give up. A search candidate (`distill.search`) is a
    step of its own: it trains all its variants there."""
    k = cfg.distill.candidates_per_step
    augmenting = cfg.distill.train.augment != "none"

    def stream(c: Candidate) -> tuple[bool, bool]:
        obj = build(c.loss)
        return obj.uses_source_data, augmenting and obj.needs_features

    groups: list[list[str]] = []
    fixed = [c for c in cfg.candidates() if c.search is None]
    for key in ((False, False), (False, True), (True, False), (True, True)):
        names = [c.name for c in fixed if stream(c) == key]
        groups += [names[i : i + k] for i in range(0, len(names), k)]
    groups += [[c.name] for c in cfg.candidates() if c.search is not None]  # a search is a group of its own
    return [",".join(g) for g in groups]
