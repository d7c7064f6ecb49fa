"""The typed run configuration: one section per pipeline step.

Every section forbids unknown keys and checks ranges, so a typo or a bad value fails before any work starts,
with a message that names the offending key. `Config()` with no arguments holds the schema's defaults, what a
config file does not set; the built-in default run (`load_config()`: `BUILTIN_RUN` over those defaults; digits,
offline, seconds on a laptop CPU) is spelled out in `configs/default.yaml`.
"""

from __future__ import annotations

import copy
import json
import posixpath
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdflow.configkeys import apply_override, did_you_mean, format_key
from kdflow.errors import ConfigError

# the architectures `kdflow.models.MODELS` builds, named here so a config is checked without importing torch
# (a test keeps the two lists equal)
ARCHITECTURES = (
    "cnn",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet8x4",
    "resnet32x4",
    "resnet18",
    "mobilenet_v3_small",
)
Architecture = Literal[ARCHITECTURES]

# the objective kinds `kdflow.objectives.OBJECTIVES` registers, named here for the same reason (a test keeps the
# two equal): what each one needs (a teacher, features, source images) is the objective class's to say
OBJECTIVE_KINDS = ("ce", "kd", "logit_mse", "hint", "dkd", "dist")
# the kinds whose class accepts `standardize: true` (`Objective.standardizable`), and those whose distillation term
# needs the labels of its transfer images, so only `transfer: target` (`Objective.needs_labelled_transfer`); the
# same test keeps these equal to the classes' flags
STANDARDIZABLE_KINDS = ("kd", "dkd")
LABELLED_TRANSFER_KINDS = ("dkd",)


def _distinct(values: list[int] | None, what: str) -> list[int] | None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError(f"{what} must be distinct, got {values}")
    return values


class _Section(BaseModel):
    # each field's docstring (the string under it) is its description in docs/config.md: `kdflow.configdoc` reads
    # them from the source when it writes the reference, not pydantic at every import (use_attribute_docstrings)
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(_Section):
    """Which source and target tasks to build and how to split them (see `kdflow.data`)."""

    source: str = "digits"
    """The source task's data: `digits`, `mnist-idx:<dir>`, `usps:<dir>`, `imagefolder:<dir>`, a torchvision name
    (`mnist`, `fashion-mnist`, `cifar10`, `cifar100`), `s3://<bucket>/<prefix>/` (an ImageFolder tree) or
    `s3://<bucket>/<key>.tar[.gz]|.tgz|.zip` (an archive of one)."""
    target: str | None = None
    """The target task's data, in the same forms; required by setup `cross_dataset`."""
    setup: Literal["cross_dataset", "class_split", "domain_shift"] = "domain_shift"
    """How the target task is made: another dataset (`cross_dataset`), the classes of `source` not in `source_classes`
    (`class_split`), or `source` transformed by `shift` (`domain_shift`)."""
    source_classes: list[int] | None = None
    """class_split: the source task's classes (default: the first half of the classes)."""
    target_classes: list[int] | None = None
    """class_split: the target task's classes (default: the rest)."""
    shift: Literal["hflip", "vflip", "rot90", "invert"] = "hflip"
    """domain_shift: the transform that makes the target images."""
    source_fraction: float = Field(0.4, gt=0.0, lt=1.0)
    """domain_shift: the share of the dataset's images that goes to the source task (the rest, shifted, is the
    target)."""
    target_samples_per_class: int | None = Field(None, ge=1)
    """Few-shot: at most this many labelled target training images per class; null: all."""
    target_val_samples_per_class: int | Literal["train"] | None = "train"
    """The cap on the target's validation images per class, so selection rests on no more labels than this: `train`
    (the training cap), a number, or null (the whole validation split). The test split is never capped."""
    max_source_samples: int | None = Field(None, ge=10)
    """At most this many source images (a quick run on a big dataset); null: all."""
    image_size: int | None = Field(None, ge=4, le=1024)
    """Resize every image to this many pixels a side (required by ImageFolder and s3:// sources); null: the data's
    own size (cross_dataset: the target's)."""
    channels: Literal[1, 3] | None = None
    """Convert every image to 1 (grey) or 3 (RGB) channels; null: the data's own (cross_dataset: the target's)."""
    val_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    """The share of each task's images held out for validation (selection, early stopping)."""
    test_fraction: float = Field(0.3, gt=0.0, lt=0.5)
    """The share of each task's images held out for the test split (the champion gate)."""
    root: str = "~/.cache/kdflow/datasets"
    """Where torchvision datasets are downloaded and cached."""
    download: bool = True
    """Download a torchvision dataset missing from `root`."""

    @property
    def from_object_store(self) -> bool:
        """Data read from s3:// URIs, whose objects can change while the config (KFP's cache key) stays the same."""
        return any(str(uri or "").startswith("s3://") for uri in (self.source, self.target))

    @field_validator("target_val_samples_per_class")
    @classmethod
    def _val_cap(cls, cap: int | str | None) -> int | str | None:
        if isinstance(cap, int) and cap < 1:
            raise ValueError(f"must be 1 or more, 'train' or null, got {cap}")
        return cap

    @field_validator("source_classes", "target_classes")
    @classmethod
    def _classes_distinct(cls, classes: list[int] | None) -> list[int] | None:
        if classes is not None and any(c < 0 for c in classes):
            raise ValueError(f"class indices must be 0 or more, got {classes}")
        return _distinct(classes, "class indices")

    @model_validator(mode="after")
    def _check_setup(self) -> DataConfig:
        if self.setup == "cross_dataset" and not self.target:
            raise ValueError("data.target is required when data.setup is 'cross_dataset'")
        if self.setup != "cross_dataset" and self.target not in (None, self.source):
            raise ValueError(
                f"data.target={self.target!r} only makes sense with data.setup='cross_dataset' "
                f"(setup is {self.setup!r})"
            )
        if self.setup == "class_split" and self.source_classes and self.target_classes:
            both = sorted(set(self.source_classes) & set(self.target_classes))
            if both:
                raise ValueError(f"data.source_classes and data.target_classes overlap: {both}")
        return self


LOCAL_PATH_SOURCES = ("mnist-idx:", "usps:", "imagefolder:")
TORCHVISION_SOURCES = ("mnist", "fashion-mnist", "cifar10", "cifar100")


def unknown_source(spec: str) -> str:
    """The message for a data source string that is none of the forms `kdflow.data.load_source` reads."""
    return (
        f"unknown data source {spec!r}: use digits, mnist-idx:<dir>, usps:<dir>, imagefolder:<dir>, "
        f"s3://<bucket>/<prefix>/, s3://<bucket>/<archive>.tar.gz|.zip or one of {', '.join(TORCHVISION_SOURCES)}"
    )


def absolute_source(spec: str | None, base: Path) -> str | None:
    """`usps:../data/usps` → `usps:/abs/data/usps` (relative to `base`); other specs are returned unchanged."""
    for prefix in LOCAL_PATH_SOURCES:
        if spec and spec.startswith(prefix):
            path = Path(spec[len(prefix) :]).expanduser()
            return prefix + str(path if path.is_absolute() else (base / path).resolve())
    return spec


def local_source_problem(spec: str | None, image_size: int | None) -> str | None:
    """Why a data source cannot be read, known before any of it is: a string of no known form, or a local folder
    (`mnist-idx:`, `usps:`, `imagefolder:`) that is missing, holds none of the files its reader looks for, or is
    an image folder without `data.image_size`; in the words of its reader in `kdflow.data.sources`. None when
    nothing is known wrong. `kdflow run` asks before it starts the pipeline, so such a run fails in seconds
    rather than in data prep."""
    if spec is None or spec == "digits" or spec in TORCHVISION_SOURCES or spec.startswith("s3://"):
        return None
    prefix = next((p for p in LOCAL_PATH_SOURCES if spec.startswith(p) and len(spec) > len(p)), None)
    if prefix is None:
        return unknown_source(spec)
    path = Path(spec[len(prefix) :]).expanduser()
    if prefix == "mnist-idx:":
        if not path.is_dir():
            return f"mnist-idx directory not found: {path}"
        pairs = [any(path.glob(f"{p}-images-idx3-ubyte*")) and any(path.glob(f"{p}-labels-idx1-ubyte*"))
                 for p in ("train", "t10k")]  # fmt: skip
        return None if any(pairs) else f"no '*-images-idx3-ubyte[.gz]' + '*-labels-idx1-ubyte[.gz]' pair in {path}"
    if prefix == "usps:":
        present = any((path / name).is_file() for name in ("usps.bz2", "usps.t.bz2"))
        return None if present else f"no usps.bz2 or usps.t.bz2 in {path}"
    if not path.is_dir():
        return f"imagefolder path not found: {path}"
    return None if image_size is not None else f"imagefolder:{path} needs data.image_size (images come in any size)"


class TrainConfig(_Section):
    """One optimisation phase: pretraining, fine-tuning or distillation."""

    epochs: int = Field(10, ge=0, le=10_000)
    """Epochs to train (a maximum with `patience`); see `epoch_over` for what one epoch is."""
    batch_size: int = Field(64, ge=1, le=65_536)
    """Images per optimizer step."""
    lr: float = Field(0.05, gt=0.0, le=10.0)
    """The peak learning rate (after the warm-up)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD with Nesterov momentum, or AdamW."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD's momentum (AdamW ignores it)."""
    weight_decay: float = Field(5e-4, ge=0.0, lt=1.0)
    """L2 weight decay (AdamW: decoupled)."""
    augment: Literal["none", "crop", "crop_flip"] = "none"
    """Training augmentation: none, random crops with padding, or crops and horizontal flips."""
    compile: bool = False
    """torch.compile the trained model: pays off on GPUs for long runs, costs start-up time."""
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    """The learning rate per optimizer step: cosine to 0 over `epochs`, constant, or step (x0.1 at 50% and 75% of
    `epochs`), after the warm-up."""
    warmup_epochs: int = Field(0, ge=0, le=1000)
    """A linear warm-up from lr/steps to lr over this many epochs (below `epochs`)."""
    patience: int | None = Field(None, ge=1, le=10_000)
    """Early stopping: end when validation has not improved for this many epochs (`epochs` is then a maximum); null
    trains every epoch. The best-validation weights are kept either way."""
    epoch_over: Literal["source", "transfer", "target"] = "source"
    """What one epoch (one validation, one unit of `epochs`, `warmup_epochs` and `patience`) is a pass over:
    `transfer`: the larger of the target and source training splits when the candidate's transfer set includes
    source images, else the target split; `source`: the larger of the two for every candidate of a distill step, so
    all get the same number of optimizer steps; `target`: the labelled target split only. Where an epoch is longer
    than the target split, the target split is reshuffled as often as that takes."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}")
        return self


class TeacherConfig(_Section):
    """The big network: pretrained on the source task, fine-tuned on the target task with a new head."""

    arch: Architecture = "cnn"
    """The teacher's architecture (`kdflow.models`)."""
    arch_kwargs: dict[str, Any] = Field(default_factory=lambda: {"width": 32})
    """Keyword arguments of the architecture's builder, e.g. `width` of `cnn`."""
    pretrained: str | None = None
    """Start from these weights instead of pretraining: a local state-dict file or a torchvision weights name
    (torchvision architectures)."""
    pretrain: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=20, lr=0.05, warmup_epochs=1, patience=5))
    """Training on the source task, to convergence (`epochs` a maximum, early stopping after `patience`)."""
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=20, lr=0.02, warmup_epochs=1, patience=5))
    """Fine-tuning on the target task with a new head, to convergence likewise."""


class PruneConfig(_Section):
    """Structured channel pruning of the fine-tuned teacher, one pruned network per ratio."""

    ratios: list[float] = Field(default_factory=lambda: [0.6, 0.75])
    """Channel-pruning ratios, each in (0, 1): one pruned teacher per ratio, for the students `from_pruned` it."""
    importance: Literal["l1", "l2", "taylor", "bn_scale", "lamp", "random"] = "l2"
    """How channels are ranked for removal (Torch-Pruning's importance criteria)."""
    global_pruning: bool = False
    """Rank channels across all layers at once instead of layer by layer."""
    round_to: int | None = Field(None, ge=1)
    """Keep channel counts multiples of this (hardware-friendly shapes); null: any count."""
    calibration_batches: int = Field(4, ge=1, le=1000)
    """Training batches the `taylor` criterion scores channels on (it needs gradients)."""

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, ratios: list[float]) -> list[float]:
        for r in ratios:
            if not 0.0 < r < 1.0:
                raise ValueError(f"each prune ratio must be in (0, 1), got {r}")
        if len(set(ratios)) != len(ratios):
            raise ValueError(f"prune ratios must be distinct, got {ratios}")
        return ratios


class StudentConfig(_Section):
    """A student network: a pruned teacher (`from_pruned: ratio`) or a fresh registry architecture. With
    `reinit`, a pruned student keeps the pruned architecture but starts from random weights: trained with `ce`,
    it is what the teacher's knowledge (its weights and its outputs) is measured against."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.]+$")
    """The student's name: the first half of its candidates' names (`<student>-<loss>`)."""
    from_pruned: float | None = None
    """Start from the teacher pruned at this ratio (one of `prune.ratios`)."""
    arch: Architecture | None = None
    """Or a fresh architecture from `kdflow.models`."""
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of `arch`'s builder."""
    reinit: bool = False
    """A pruned student with random weights (the pruned shapes only): the from-scratch baseline."""

    @model_validator(mode="after")
    def _one_origin(self) -> StudentConfig:
        if (self.from_pruned is None) == (self.arch is None):
            raise ValueError(f"student {self.name!r} needs exactly one of from_pruned or arch")
        if self.reinit and self.from_pruned is None:
            raise ValueError(f"student {self.name!r}: reinit applies to a pruned student (from_pruned)")
        return self

    @property
    def init(self) -> str:
        """Where its weights start: "pruned" (the pruned teacher's), "scratch" (pruned shapes, random weights) or
        "random" (a registry architecture)."""
        if self.from_pruned is None:
            return "random"
        return "scratch" if self.reinit else "pruned"


class LossConfig(_Section):
    """How a student learns: the objective kind and its weights (see `kdflow.objectives`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.]+$")
    """The loss's name: the second half of its candidates' names."""
    kind: Literal[OBJECTIVE_KINDS]
    """The objective (`kdflow.objectives`): `ce` (no teacher), `kd`, `logit_mse`, `hint`, `dkd` or `dist`."""
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    """The softmax temperature T of kd, hint, dkd and dist."""
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    """kd and hint: the weight of the distillation term, (1 − α)·CE + α·T²·KL; dkd: TCKD's weight."""
    lam: float = Field(1.0, ge=0.0, le=1e4)
    """logit_mse: the weight λ of its term, CE + λ·‖f_T(x) − f_S(x)‖²."""
    beta: float = Field(1.0, ge=0.0, le=1e4)
    """dkd: NCKD's weight; dist: the inter-class term's weight; hint: the feature hint's weight."""
    gamma: float = Field(1.0, ge=0.0, le=1e4)
    """dist: the intra-class term's weight."""
    standardize: bool = False
    """z-score the student's and the teacher's transfer logits before the softened softmax (kd, dkd)."""
    transfer: Literal["target", "source", "both"] = "target"
    """The images the distillation term is computed on: the target task's, the source task's, or both (dkd: target
    only, it needs labels)."""

    @model_validator(mode="after")
    def _kind_options(self) -> LossConfig:
        if self.standardize and self.kind not in STANDARDIZABLE_KINDS:
            raise ValueError(
                f"standardize: true applies only to kinds {', '.join(STANDARDIZABLE_KINDS)}; "
                f"loss {self.name!r} has kind {self.kind!r}"
            )
        if self.kind in LABELLED_TRANSFER_KINDS and self.transfer != "target":
            raise ValueError(
                f"loss {self.name!r} of kind {self.kind!r} needs the labels of its transfer images, so transfer "
                f"must be 'target' (got transfer: {self.transfer!r})"
            )
        return self


class SearchConfig(_Section):
    """Adaptive distillation (`kdflow.search`): per student, `variants` loss settings drawn by Optuna from this
    space (plus plain CE, α = 0, always), trained side by side on one data stream and halved on validation at
    every rung (after `rung_epochs`, then `reduction` times as many each time): the survivor trains on to the
    end and is the student's candidate `<student>-<name>`."""

    name: str = Field("auto", pattern=r"^[A-Za-z0-9_.]+$")
    """The search candidate's loss name: the candidate is `<student>-<name>`."""
    variants: int = Field(8, ge=2, le=64)
    """Loss settings drawn per student, the plain-CE one included."""
    rung_epochs: int = Field(3, ge=1, le=1000)
    """Epochs before the first halving; each later rung is `reduction` times longer."""
    reduction: int = Field(2, ge=2, le=8)
    """Each rung keeps the best 1/reduction of the variants still training."""
    kinds: list[Literal[OBJECTIVE_KINDS]] = Field(default_factory=lambda: ["kd", "logit_mse", "dkd", "dist"])
    """The logit objectives the search draws from (plain CE is always in the space)."""
    transfer: list[Literal["target", "source", "both"]] = Field(default_factory=lambda: ["target", "both"])
    """The transfer sets to try; `source` and `both` need the source task's images (a kind needing labelled transfer
    images always uses `target`)."""
    temperature: tuple[float, float] = (1.0, 8.0)
    """[low, high] of T, sampled log-uniformly."""
    alpha: tuple[float, float] = (0.1, 1.0)
    """[low, high] of α, sampled uniformly (α = 0 is the plain-CE variant every search has)."""
    lam: tuple[float, float] = (0.01, 10.0)
    """[low, high] of λ, sampled log-uniformly."""
    beta: tuple[float, float] = (0.5, 8.0)
    """[low, high] of β (DKD's NCKD weight, DIST's inter-class weight), sampled log-uniformly."""
    gamma: tuple[float, float] = (0.5, 8.0)
    """[low, high] of γ (DIST's intra-class weight), sampled log-uniformly."""
    sampler: Literal["tpe", "random"] = "tpe"
    """Optuna's sampler: TPE or random."""

    @field_validator("kinds")
    @classmethod
    def _distilling(cls, kinds: list[str]) -> list[str]:
        logit = [k for k in OBJECTIVE_KINDS if k not in ("ce", "hint")]
        if not kinds or any(k not in logit for k in kinds):
            raise ValueError(
                f"search kinds must be logit objectives ({', '.join(logit)}); got {kinds} (plain CE is always in "
                "the space)"
            )
        return _distinct(kinds, "search kinds")

    @field_validator("transfer")
    @classmethod
    def _transfers(cls, transfer: list[str]) -> list[str]:
        if not transfer:
            raise ValueError("search transfer must list at least one of target, source, both")
        return _distinct(transfer, "search transfer sets")

    @field_validator("temperature", "alpha", "lam", "beta", "gamma")
    @classmethod
    def _range(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = bounds
        if not 0 < low <= high:
            raise ValueError(f"a search range is [low, high] with 0 < low <= high, got {list(bounds)}")
        return bounds

    @model_validator(mode="after")
    def _alpha_at_most_one(self) -> SearchConfig:
        if self.alpha[1] > 1.0:
            raise ValueError(f"search alpha range must lie in (0, 1], got {list(self.alpha)}")
        points = self.distinct_points()
        if points is not None and points < self.variants:
            raise ValueError(
                f"the search space holds only {points} distinct settings (plain CE included), fewer than "
                f"variants={self.variants}: widen a range or lower distill.search.variants"
            )
        return self

    def distinct_points(self) -> int | None:
        """How many distinct settings the space holds when every range a kind reads is a single value (None: a
        range of real values, so as many as wanted). Mirrors `kdflow.search` draws."""
        ranges = {"kd": ("temperature", "alpha"), "logit_mse": ("lam",), "dkd": ("temperature", "alpha", "beta"),
                  "dist": ("temperature", "beta", "gamma")}  # fmt: skip
        if any(getattr(self, r)[0] != getattr(self, r)[1] for k in self.kinds for r in ranges[k]):
            return None
        total = 1  # plain CE
        for k in self.kinds:
            transfers = 1 if k in LABELLED_TRANSFER_KINDS else len(self.transfer)
            total += transfers * (2 if k in STANDARDIZABLE_KINDS else 1)
        return total


class Candidate(_Section):
    """One cell of the candidate grid: a student trained with one loss, named `<student>-<loss>`. A search
    candidate (`search` set) chooses its loss in its distill step; its `loss` holds only its name until then."""

    student: StudentConfig
    """The student network."""
    loss: LossConfig
    """The loss it trains with (a search candidate's: its name only, until its step chooses)."""
    search: SearchConfig | None = None
    """The search that chooses the loss, for a search candidate."""

    @property
    def name(self) -> str:
        return f"{self.student.name}-{self.loss.name}"


class DistillConfig(_Section):
    """The candidate grid: every student is trained with every loss, side by side."""

    students: list[StudentConfig] = Field(
        default_factory=lambda: [
            StudentConfig(name="pruned60", from_pruned=0.6),
            StudentConfig(name="pruned75", from_pruned=0.75),
        ]
    )
    """The students: every one trains with every loss."""
    losses: list[LossConfig] = Field(
        default_factory=lambda: [
            LossConfig(name="kd", kind="kd", temperature=4.0, alpha=0.9),
            LossConfig(name="logit_mse", kind="logit_mse", lam=0.1),
            LossConfig(name="ce", kind="ce"),
        ]
    )
    """The losses: every one trains every student."""
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=30, lr=0.05))
    """The students' training."""
    candidates_per_step: int = Field(3, ge=1, le=256)
    """Candidates trained together in one distill step (one process, one data stream, one teacher pass per batch); 1 =
    a pod per candidate."""
    ce_baseline: bool = True
    """When no loss of the grid is `ce`, every student also trains with plain cross-entropy (`ce`): the baseline each
    distilled candidate's gain is measured against, on the same test images."""
    scratch_baselines: bool = False
    """Each pruned student's architecture also trains from random weights with plain CE (`<student>_scratch-ce`): what
    the teacher's weights and outputs are worth together."""
    search: SearchConfig | None = None
    """Adaptive distillation: one more candidate per student whose loss settings a successive-halving search on
    validation chooses (`kdflow.search`); null: no search."""
    seeds: list[int] | None = Field(None, min_length=1, max_length=20)
    """Training seeds: every candidate trains once per seed, the first seed's model is registered, selection uses the
    seeds' mean validation metrics and the evidence's intervals cover the seed spread; null: the run's `seed` alone."""

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be 0 or more, got {seeds}")
        return _distinct(seeds, "seeds")

    @model_validator(mode="after")
    def _unique_names(self) -> DistillConfig:
        for what, items in (("students", self.students), ("losses", self.losses)):
            names = [i.name for i in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"distill.{what} names must be unique, repeated: {dup}")
        if not self.students or not self.losses:
            raise ValueError("distill.students and distill.losses must each list at least one entry")
        taken = {l.name for l in self.losses} | {"ce", "ce_baseline"}  # (the names a ce baseline may be given)
        if self.search is not None and self.search.name in taken:
            raise ValueError(f"distill.search.name {self.search.name!r} is also the name of a loss or a ce baseline")
        return self


class EvalConfig(_Section):
    """What evaluation measures and how hard it tries (latency repeats)."""

    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    """Batch sizes whose CPU latency is measured; 1 is required (the policy and the summary read it)."""
    latency_warmup: int = Field(5, ge=0, le=1000)
    """Untimed forward passes before timing."""
    latency_repeats: int = Field(30, ge=1, le=10_000)
    """Timed forward passes; the median is reported."""
    latency_threads: int = Field(1, ge=1, le=256)
    """CPU threads while timing."""
    ece_bins: int = Field(15, ge=2, le=1000)
    """Confidence bins of the expected calibration error."""
    min_speedup_share: float = Field(0.5, gt=0.0, le=1.0)
    """"Is it really faster": a candidate whose measured speed-up over the teacher (ONNX Runtime when exported,
    else PyTorch, at `speedup_batch`) is below this share of its MAC ratio is flagged."""
    speedup_batch: int | None = Field(None, ge=1)
    """The batch size the speed-up is measured at; null: the largest of `latency_batch_sizes`."""

    @field_validator("latency_batch_sizes")
    @classmethod
    def _batch_sizes(cls, sizes: list[int]) -> list[int]:
        if any(b < 1 or b > 65_536 for b in sizes):
            raise ValueError(f"latency batch sizes must be in [1, 65536], got {sizes}")
        if 1 not in sizes:  # batch-1 latency feeds the policy's max_latency_ms and the run's summary
            raise ValueError(f"latency batch sizes must include 1, got {sizes}")
        return _distinct(sizes, "latency batch sizes")

    @model_validator(mode="after")
    def _speedup_batch_timed(self) -> EvalConfig:
        if self.speedup_batch is not None and self.speedup_batch not in self.latency_batch_sizes:
            raise ValueError(
                f"evaluate.speedup_batch={self.speedup_batch} is not one of "
                f"evaluate.latency_batch_sizes={self.latency_batch_sizes}"
            )
        return self

    @property
    def speedup_at(self) -> int:
        """The batch size the measured speed-up is taken at."""
        return self.speedup_batch or max(self.latency_batch_sizes)


class ExportConfig(_Section):
    """ONNX export of the teacher and every candidate (normalisation included, dynamic batch axis), checked
    against PyTorch on the target test split: a max absolute logit difference above `parity_atol` or a top-1
    disagreement on any test image fails that model's export."""

    onnx: bool = True
    """Export to ONNX and log it with MLflow's `onnx` flavor next to the pt2 model."""
    opset: int = Field(18, ge=18, le=23)
    """The ONNX opset (the dynamo exporter's: 18 to 23)."""
    parity_atol: float = Field(1e-3, gt=0.0, le=10.0)
    """The largest absolute logit difference to PyTorch on the target test split that passes."""


class QuantizeConfig(_Section):
    """INT8 post-training static quantization of every candidate's ONNX model with ONNX Runtime (QDQ format,
    int8 weights, uint8 activations), calibrated on target training images; each quantized model becomes a
    candidate of its own (`<candidate>-int8`). Weights get one scale per tensor by default: on MNIST -> USPS
    per-channel scales lost 0.8-4.5 test points where per-tensor lost 0-0.2 (benchmarks/README.md)."""

    enabled: bool = False
    """Quantize every candidate to INT8 (each becomes a candidate `<candidate>-int8`); needs `export.onnx`."""
    calibration_images: int = Field(512, ge=1, le=100_000)
    """Calibration images, a seeded draw from the target training split."""
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    """ONNX Runtime's calibration method."""
    per_channel: bool = False
    """One weight scale per output channel instead of per tensor."""


class CheckpointConfig(_Section):
    """Epoch checkpoints of the teacher and distill steps' training (`kdflow.engine.resume`): a step killed
    mid-training (a preempted GPU node, `kill -9`, a crash) continues from its last one when it is retried or the
    local run is resumed (`kdflow run --resume`). They are artifacts of the pipeline's parent MLflow run, under
    `checkpoints/`, deleted when the pipeline succeeds."""

    enabled: bool = True
    """Write epoch checkpoints (off: an interrupted training step starts again from its first epoch)."""
    every_s: float = Field(30.0, ge=0.0)
    """At most one checkpoint per this many seconds of training (0: at every epoch's end)."""
    max_share: float = Field(0.02, gt=0.0)
    """And only while writing them costs at most this share of the training time (the last write's cost tells)."""


class PolicyConfig(_Section):
    """How the best candidate is chosen on validation data, before the champion gate on test data."""

    metric: Literal["val_top1", "val_top5", "val_loss"] = "val_top1"
    """What the best candidate is chosen by, on validation data."""
    min_compression: float | None = Field(4.0, ge=1.0)
    """Candidates need teacher params / student params of at least this; null: no constraint."""
    max_params: int | None = Field(None, ge=1)
    """Candidates need at most this many parameters; null: no constraint."""
    max_latency_ms: float | None = Field(None, gt=0.0)
    """Candidates need a batch-1 CPU latency of at most this; null: no constraint."""
    min_teacher_retention: float | None = Field(None, gt=0.0, le=2.0)
    """Candidates need student / teacher validation accuracy of at least this; null: no constraint."""
    min_speedup: float | None = Field(None, gt=0.0)
    """Candidates need a measured latency speed-up over the teacher of at least this (`speedup`); null: none."""


class RegistryConfig(_Section):
    """Where candidates are registered and what a new champion must beat."""

    model_name: str = Field("kdflow-digits-student", min_length=1, max_length=256)
    """The registered model every candidate becomes a version of."""
    teacher_model_name: str = Field("kdflow-digits-teacher", min_length=1, max_length=256)
    """The registered model of the teachers (apart, so they never compete for the alias)."""
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", max_length=200)
    """The alias the champion carries (at most 200 characters: it is part of the tag keys of its move history)."""
    champion_metric: Literal["test_top1", "test_top5"] = "test_top1"
    """What the pick must beat the current champion on, on the same test data."""
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)
    """gate improvement: the margin the pick must beat the champion by."""
    gate: Literal["improvement", "significance"] = "improvement"
    """`improvement`: the pick becomes champion when its champion_metric beats the champion's by more than
    min_improvement; `significance`: only when a paired test on the same test images says it is better (McNemar p <
    significance_level and the paired bootstrap interval above 0; top-1 only)."""
    significance_level: float = Field(0.05, gt=0.0, lt=1.0)
    """gate significance: the McNemar p-value the pick must stay below."""
    settle_seconds: float = Field(2.0, ge=0.0, le=600.0)
    """After its last write of the alias, a register step watches it this long and writes again if a concurrent
    pipeline's stale write put a worse pick there (`kdflow.registry.settle_alias`)."""
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """How the pick is chosen among the candidates."""

    @field_validator("model_name", "teacher_model_name")
    @classmethod
    def _registry_name(cls, name: str) -> str:
        """MLflow 3's rules for a registered model's name (`mlflow.utils.validation._validate_model_name`), checked
        here so a bad name fails before training rather than at registration."""
        if not name.strip():
            raise ValueError("a registered model name cannot be blank")
        if "/" in name or ":" in name:
            raise ValueError(f"MLflow model names cannot contain '/' or ':', got {name!r}")
        norm = posixpath.normpath(name)
        if norm != name or norm == "." or norm.startswith(".."):
            raise ValueError(f"MLflow treats model names as paths: {name!r} would resolve to {norm!r}")
        return name

    @field_validator("alias")
    @classmethod
    def _alias_not_reserved(cls, alias: str) -> str:
        """MLflow reserves `latest` (any case) and version names (`v3`) as aliases."""
        if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise ValueError(f"MLflow reserves the alias {alias!r} (latest and v<number> name versions)")
        return alias

    @model_validator(mode="after")
    def _names_apart(self) -> RegistryConfig:
        if self.model_name == self.teacher_model_name:
            raise ValueError(
                f"registry.model_name and registry.teacher_model_name are both {self.model_name!r}: teacher versions "
                "would compete with the students for the alias"
            )
        return self

    @model_validator(mode="after")
    def _gate_metric(self) -> RegistryConfig:
        if self.gate == "significance" and self.champion_metric != "test_top1":
            raise ValueError(
                f"registry.gate=significance compares per-image top-1 correctness; "
                f"registry.champion_metric={self.champion_metric!r} must be 'test_top1'"
            )
        return self


K8S_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"  # a Kubernetes resource quantity
DURATION = r"^[0-9]+s$"  # KFP retry durations are whole seconds, e.g. "60s"


class Resources(_Section):
    """CPU/memory requests and limits for one kind of step (Kubernetes quantities: "4", "500m", "16G")."""

    cpu_request: str | None = Field(None, pattern=K8S_QUANTITY)
    """CPU request, e.g. `4` or `500m`."""
    cpu_limit: str | None = Field(None, pattern=K8S_QUANTITY)
    """CPU limit."""
    memory_request: str | None = Field(None, pattern=K8S_QUANTITY)
    """Memory request, e.g. `16G`."""
    memory_limit: str | None = Field(None, pattern=K8S_QUANTITY)
    """Memory limit."""


class Toleration(_Section):
    """A pod toleration, so GPU steps may land on tainted GPU nodes."""

    key: str
    """The taint's key."""
    operator: Literal["Exists", "Equal"] = "Exists"
    """`Exists` (any value) or `Equal` (`value`)."""
    value: str | None = None
    """With `Equal`: the taint's value."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect tolerated; null: all."""
    toleration_seconds: int | None = Field(None, ge=0)
    """With `NoExecute`: how long the pod stays after the taint appears."""


class RetryConfig(_Section):
    """Retries with exponential backoff for transient failures (node preemption, a flaky store)."""

    max_retries: int = Field(2, ge=0, le=100)
    """Retries of a failed step (the local runner never retries)."""
    backoff: str = Field("30s", pattern=DURATION)
    """The first wait before a retry, in whole seconds (`30s`)."""
    backoff_factor: float = Field(2.0, ge=1.0, le=10.0)
    """Each later wait is this many times longer."""
    max_backoff: str = Field("600s", pattern=DURATION)
    """The longest wait, in whole seconds."""


class ClusterConfig(_Section):
    """Settings that only matter on Kubeflow: placement, resources, retries and where secrets come from.

    KFP fixes these in the compiled spec, so they apply at `kdflow compile` / `kdflow submit` time."""

    gpus: int = Field(1, ge=0, le=16)
    """GPUs per training step (teacher, distill, evaluate); 0: CPU only."""
    teacher_gpus: int | None = Field(None, ge=0, le=16)
    """The teacher step's own GPU count (several: DDP); null: `gpus`."""
    accelerator: str = "nvidia.com/gpu"
    """The GPU resource name."""
    teacher_processes: int | None = Field(None, ge=1, le=64)
    """torchrun workers of the teacher step; null: one per visible GPU."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels GPU steps must land on, e.g. {"nvidia.com/gpu.present": "true"}."""
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    )
    """Tolerations of the GPU steps, so they may land on tainted GPU nodes."""
    gpu_resources: Resources = Field(
        default_factory=lambda: Resources(cpu_request="4", cpu_limit="8", memory_request="16G", memory_limit="32G")
    )
    """Requests and limits of the GPU steps."""
    cpu_resources: Resources = Field(
        default_factory=lambda: Resources(cpu_request="1", cpu_limit="2", memory_request="2G", memory_limit="4G")
    )
    """Requests and limits of the CPU steps."""
    shm_size: str | None = Field("2Gi", pattern=K8S_QUANTITY)
    """A memory-backed /dev/shm of this size for the training steps; null: no mount."""
    retry: RetryConfig = Field(default_factory=RetryConfig)
    """Retries of transient failures."""
    cache_data_prep: bool = True
    """Let KFP reuse a data prep of the same config (never for s3:// data, which can change)."""
    tracking_config_map: str | None = "kdflow-mlflow"
    """The ConfigMap with MLFLOW_TRACKING_URI (and MLFLOW_S3_ENDPOINT_URL); null: none."""
    config_map_keys: list[str] = Field(default_factory=lambda: ["MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"])
    """The ConfigMap's keys passed to the steps as environment variables."""
    s3_secret: str | None = "kdflow-s3"
    """The Secret with the S3 credentials for data and MLflow artifacts; null: none."""
    secret_keys: list[str] = Field(default_factory=lambda: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    """The Secret's keys passed to the steps as environment variables."""
    pipeline_root: str | None = None
    """Where KFP keeps the steps' artifacts, e.g. `s3://kdflow-pipelines/root`; null: the cluster's default."""


class Config(_Section):
    """A whole kdflow run."""

    experiment: str = Field("kdflow-digits", min_length=1)
    """The MLflow experiment the run's records go to."""
    seed: int = Field(0, ge=0)
    """The run's seed: splits, initial weights, batch order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where training runs: a GPU when there is one (`auto`), or the one named."""
    data: DataConfig = Field(default_factory=DataConfig)
    """The source and target tasks."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    """The teacher."""
    prune: PruneConfig = Field(default_factory=PruneConfig)
    """Pruning of the teacher."""
    distill: DistillConfig = Field(default_factory=DistillConfig)
    """The candidate grid and its training."""
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    """What evaluation measures."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Epoch checkpoints of the training steps, for resume."""
    export: ExportConfig = Field(default_factory=ExportConfig)
    """ONNX export of the teacher and every candidate, with its parity check."""
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    """Optional INT8 post-training quantization of the candidates."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """Registration and the champion."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Kubeflow placement (applied at compile and submit time)."""

    @model_validator(mode="after")
    def _quantize_needs_onnx(self) -> Config:
        if self.quantize.enabled and not self.export.onnx:
            raise ValueError("quantize.enabled needs export.onnx: the INT8 models are quantized ONNX models")
        return self

    @model_validator(mode="after")
    def _students_match_pruning(self) -> Config:
        for s in self.distill.students:
            if s.from_pruned is not None and s.from_pruned not in self.prune.ratios:
                raise ValueError(
                    f"distill.students[{s.name}].from_pruned={s.from_pruned} is not one of "
                    f"prune.ratios={self.prune.ratios}"
                )
        return self

    @property
    def seeds(self) -> list[int]:
        """The distill step's training seeds: `distill.seeds`, or the run's seed."""
        return list(self.distill.seeds or [self.seed])

    def candidates(self) -> list[Candidate]:
        """The student × loss grid, students first: what the pipeline's distill steps train. With
        `distill.ce_baseline` and no `ce` loss in the grid, a `ce` loss is added (named "ce", or "ce_baseline"
        when a loss of another kind took that name)."""
        losses = list(self.distill.losses)
        if self.distill.ce_baseline and not any(l.kind == "ce" for l in losses):
            taken = {l.name for l in losses}
            losses.append(LossConfig(name="ce" if "ce" not in taken else "ce_baseline", kind="ce"))
        grid = [Candidate(student=s, loss=l) for s in self.distill.students for l in losses]
        if self.distill.scratch_baselines:
            ce = LossConfig(name="ce", kind="ce")
            for s in self.distill.students:
                if s.from_pruned is not None and not s.reinit:
                    twin = s.model_copy(update={"name": f"{s.name}_scratch", "reinit": True})
                    grid.append(Candidate(student=twin, loss=ce))
        if (search := self.distill.search) is not None:
            placeholder = LossConfig(name=search.name, kind="ce")
            grid += [Candidate(student=s, loss=placeholder, search=search) for s in self.distill.students]
        return grid

    def candidate(self, name: str) -> Candidate:
        """The grid's candidate called `name`; an unknown name lists the known ones."""
        for c in self.candidates():
            if c.name == name:
                return c
        raise ConfigError(f"unknown candidate {name!r}; the config defines {[c.name for c in self.candidates()]}")

    def with_local_paths(self, base: Path) -> Config:
        """A copy whose local data paths are absolute, so steps running in other folders find the data."""
        data = self.data.model_copy(
            update={
                "source": absolute_source(self.data.source, base),
                "target": absolute_source(self.data.target, base),
            }
        )
        return self.model_copy(update={"data": data})

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def flat(self) -> dict[str, str]:
        """Dotted keys → values, for MLflow params; credentials redacted (`kdflow.secrets.scrub`)."""
        from kdflow.secrets import scrub

        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                value = scrub(value, prefix)
                out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

        walk("", self.model_dump(mode="json"))
        return out


def _format_error(err: ValidationError, origin: str) -> str:
    """One line for one bad key (`invalid config (origin): key: why (got value)`), else one line per key."""
    problems = []
    for e in err.errors():
        key = format_key(e["loc"]) or "<root>"  # list entries as [i], the form --set reads
        if e["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key{did_you_mean(Config, e['loc'])}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{key}: {e['msg']}{shown}")
    if len(problems) == 1:
        return f"invalid config ({origin}): {problems[0]}"
    return "\n".join([f"invalid config ({origin}):", *(f"  {p}" for p in problems)])


def parse_config(data: dict[str, Any] | None, origin: str = "<dict>") -> Config:
    """Validate a mapping into a Config; raise ConfigError naming every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config ({origin}): top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


# The built-in default run (`kdflow run` without --config; `configs/default.yaml` spells it out): what it sets
# beyond the schema's defaults. A few-shot target (10 labelled flipped digits per class) and two small students
# trained from scratch, distilled on the target and the source images: a task where the teacher's knowledge can
# matter, so the evidence columns have something to show. Every candidate trains the same number of optimizer
# steps (epochs over the target split at batch 16), so the `ce` baselines are not short-changed.
BUILTIN_RUN: dict[str, Any] = {
    "data": {"source_fraction": 0.6, "target_samples_per_class": 10},
    "teacher": {
        "finetune": {"epochs": 60, "batch_size": 16, "lr": 0.01, "warmup_epochs": 1, "patience": 15, "augment": "crop"}
    },
    "prune": {"ratios": [0.75]},
    "distill": {
        "students": [
            {"name": "cnn4", "arch": "cnn", "arch_kwargs": {"width": 4}},
            {"name": "cnn8", "arch": "cnn", "arch_kwargs": {"width": 8}},
        ],
        "losses": [
            {"name": "kd", "kind": "kd", "temperature": 4.0, "alpha": 0.9, "transfer": "both"},
            {"name": "logit_mse", "kind": "logit_mse", "lam": 0.1, "transfer": "both"},
            {"name": "ce", "kind": "ce"},
        ],
        "train": {
            "epochs": 50, "batch_size": 16, "lr": 0.05, "warmup_epochs": 2, "patience": 20, "epoch_over": "target"
        },
    },
}  # fmt: skip


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: the problem and where (`line 3, column 7`)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or the built-in default run, `BUILTIN_RUN`, when `path` is None) and apply dotted
    overrides. A file's values replace the schema's defaults (`Config()`); the built-in run is one such file."""
    data: dict[str, Any] = copy.deepcopy(BUILTIN_RUN) if path is None else {}
    origin = "built-in default"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {yaml_problem(err)}") from None
        origin = str(p)
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config ({origin}): top level must be a mapping, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        apply_override(data, Config, dotted, value)
    return parse_config(data, origin)


def config_yaml(cfg: Config, origin: str = "") -> str:
    """The whole config as YAML, every key with its value (defaults included), in the schema's order: what
    `kdflow config show` prints. `load_config` reads it back to the same config."""
    head = f"# kdflow config: {origin}\n" if origin else ""
    return head + yaml.dump(cfg.model_dump(mode="json"), Dumper=_ConfigDumper, sort_keys=False, width=1000)


class _ConfigDumper(yaml.SafeDumper):
    """Sections as blocks, a list of plain values on one line (`ratios: [0.6, 0.75]`)."""

    def represent_list(self, data):
        flow = all(not isinstance(v, (dict, list)) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ConfigDumper.add_representer(list, _ConfigDumper.represent_list)


def first_difference(a, b, prefix: str = "") -> str:
    """The first dotted key where two config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    return prefix or "the config"


def config_from_json(text: str) -> Config:
    """What each pipeline step calls on the config string it was handed: its `${env:NAME}` references (the
    credentials a local run moved to the environment, or that a pod gets from a Kubernetes Secret) resolved."""
    from kdflow.secrets import from_env

    try:
        data = from_env(json.loads(text))
    except KeyError as err:
        raise ConfigError(f"invalid config (pipeline parameter config_json): {err.args[0]}") from None
    return parse_config(data, "pipeline parameter config_json")
