"""The frozen teacher's outputs during training: their stored format, the key that ties them to one teacher
and one dataset, and ONE source object, chosen before the loop, that gives every batch its teacher outputs.

Three sources, by what the run can afford:
- `Cached`: without random augmentation every epoch shows the same images, so the teacher's logits (and hint
  features that fit in memory) are computed once, or taken from the teacher step's `teacher_outputs.pt`, and
  looked up per batch;
- `Table`: with random crops, a table of the teacher's logits for every crop variant of every target image,
  looked up by each sample's drawn variant: the teacher step's complete table, or one filled as the crops are
  drawn (the teacher runs once per (image, crop) drawn, never more often than per batch). Source images still
  run through the teacher per batch;
- `Live`: a teacher forward pass per batch, shared by all students (hint features that do not fit, or no room
  for a table).
The training loop calls `source(batch)` and never asks which one it has.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from kdflow.data.augment import augment_variant, augment_variants
from kdflow.data.dataset import Normalizer
from kdflow.engine.device import FeatureTap, autocast, nhwc, prepare
from kdflow.engine.stream import Batch

FEATURE_CACHE_BYTES = 1 << 30  # teacher hint features larger than this are recomputed per batch instead
TABLE_BYTES = 256 << 20  # teacher-output tables of augmented images larger than this are not built


@dataclass
class TeacherOutputs:
    """The frozen teacher's logits for every image of the transfer splits, row i for image i: computed once and
    reused by every epoch and every candidate instead of a teacher pass per batch. `key` ties them to one
    teacher's weights and one dataset (`teacher_outputs_key`), so stale outputs are refused.

    With random augmentation (`augment` "crop" or "crop_flip") `target` is a table (N, V, K): the logits of every
    augmentation variant of every target image (`augment_variant`), so each batch's random crops are looked up,
    exactly the outputs the teacher would give, never stale ones. Source images are then not tabulated (they are
    drawn from a large pool, a few per step): the teacher runs on them per batch."""

    key: str
    target: torch.Tensor  # (N_target_train, K), or (N_target_train, V, K) per augmentation variant
    source: torch.Tensor | None = None  # (N_source_train, K) when a transfer set uses source images
    features: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer → split → (N, C, H, W)
    augment: str = "none"

    @property
    def is_table(self) -> bool:
        return self.augment != "none"


def teacher_outputs_key(teacher: nn.Module, data_hash: str) -> str:
    """sha256 over the teacher's weights and the dataset's content hash."""
    h = hashlib.sha256(data_hash.encode())
    for name, t in teacher.state_dict().items():
        h.update(name.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_teacher_outputs(
    teacher: nn.Module,
    normalizer: Normalizer,
    key: str,
    target: torch.Tensor,
    source: torch.Tensor | None = None,
    feature_layers: tuple[str, ...] = (),
    batch_size: int = 128,
    augment: str = "none",
) -> TeacherOutputs:
    """Run the frozen teacher once over uint8 images (N, C, H, W) of the target (and source) train split, in
    eval mode and the training loop's autocast, keeping logits (and the named layers' outputs) on the device.

    With `augment` other than "none" the target logits are a table over every augmentation variant, (N, V, K);
    the source split and hint features are not tabulated then. Batches of 128 keep a small CNN's activations in
    the CPU's cache (bigger batches run slower per image there)."""
    if augment != "none" and (source is not None or feature_layers):
        raise ValueError("with random augmentation only the target split's logits are tabulated")
    device = next(teacher.parameters()).device
    prepare(device)
    teacher.eval()
    if target.dim() == 4:
        teacher.to(memory_format=torch.channels_last)
    normalizer = normalizer.to(device)
    amp, _ = autocast(device)
    taps = {layer: FeatureTap(teacher, layer) for layer in feature_layers}
    out = TeacherOutputs(key=key, target=torch.empty(0), augment=augment)
    variants = augment_variants(augment, target.shape[-2])
    for split, x in (("target", target), ("source", source)):
        if x is None:
            continue
        logits, feats = [], {layer: [] for layer in taps}
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device)
            per_variant = []
            for v in range(variants):
                xv = normalizer(augment_variant(xb, augment, v))
                with amp:
                    per_variant.append(teacher(nhwc(xv)).float())
                for layer, tap in taps.items():
                    feats[layer].append(tap.value.float())
            logits.append(torch.stack(per_variant, 1) if augment != "none" else per_variant[0])  # (B, V, K) | (B, K)
        setattr(out, split, torch.cat(logits))
        for layer in taps:
            out.features.setdefault(layer, {})[split] = torch.cat(feats[layer])
    for tap in taps.values():
        tap.close()
    return out


def tabulate_teacher(
    teacher: nn.Module, normalizer: Normalizer, images: torch.Tensor, augment: str, epochs: int, key: str = ""
) -> TeacherOutputs | None:
    """The teacher's logits for every augmentation variant of uint8 `images` (N, C, H, W), when such a table pays,
    else None. It costs V·N teacher images once and serves every training run (each distill step, each sweep),
    where each run without it costs up to epochs·N (fewer: `fit_many` keeps the crops it has drawn): built when
    V ≤ epochs and the table fits in TABLE_BYTES."""
    if (
        augment == "none"
        or augment_variants(augment, images.shape[-2]) > epochs
        or not table_shape(teacher, normalizer, images, augment)
    ):
        return None
    return compute_teacher_outputs(teacher, normalizer, key, images, augment=augment)


def table_shape(
    teacher: nn.Module, normalizer: Normalizer, images: torch.Tensor, augment: str
) -> tuple[int, int, int] | None:
    """(N, V, K) of a table of teacher logits for every augmentation variant of `images`, or None when it would
    not fit in TABLE_BYTES. One image through the teacher tells the class count K."""
    device = next(teacher.parameters()).device
    with torch.no_grad():
        num_classes = teacher.eval()(normalizer.to(device)(images[:1].to(device))).shape[1]
    shape = (len(images), augment_variants(augment, images.shape[-2]), num_classes)
    return shape if shape[0] * shape[1] * shape[2] * 4 <= TABLE_BYTES else None


def feature_bytes(teacher: nn.Module, normalizer: Normalizer, x: torch.Tensor, tap: FeatureTap) -> int:
    """Bytes of the tapped teacher layer's output for one image: tells what caching that layer would cost."""
    with torch.no_grad():
        teacher(normalizer(x[:1]))
    return tap.value.element_size() * tap.value[0].numel()


# ------------------------------------------------------------------------------------------------ the sources


@dataclass
class TeacherView:
    """The teacher on one batch: logits on its target and source images, hint features over [target; source]."""

    target: torch.Tensor | None  # (B, K)
    source: torch.Tensor | None  # (B, K), when the stream has source images
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → (B or 2B, C, H, W)


class TeacherSource:
    """Gives each batch its teacher outputs; `teacher_source` picks the kind once, before the first epoch.
    This base class is the source of a run that distils nothing: no outputs."""

    def __call__(self, batch: Batch) -> TeacherView:
        return TeacherView(None, None)


@dataclass
class Cached(TeacherSource):
    """Outputs computed before the loop, on the device: looked up by the batch's rows."""

    outputs: TeacherOutputs
    layers: tuple[str, ...]  # the hint layers whose features the students need (all in `outputs.features`)

    def __call__(self, b: Batch) -> TeacherView:
        both = b.xs is not None
        out = self.outputs
        features = {}
        for layer in self.layers:
            f = out.features[layer]
            features[layer] = torch.cat([f["target"][b.idx], f["source"][b.src_idx]]) if both else f["target"][b.idx]
        return TeacherView(out.target[b.idx], out.source[b.src_idx] if both else None, features)


@dataclass
class Table(TeacherSource):
    """A table (N, V, K) over every crop variant of the target images, looked up by each sample's variant.
    With `filled` (an unfilled table) each (image, variant) is run through the teacher the first time it is
    drawn. Source images go through the teacher per batch."""

    table: torch.Tensor
    teacher: nn.Module | None
    filled: torch.Tensor | None = None  # (N, V) bool: which entries hold the teacher's logits already

    def __post_init__(self) -> None:
        self.amp = autocast(self.table.device)[0]

    def __call__(self, b: Batch) -> TeacherView:
        if self.filled is not None:  # crops drawn for the first time: through the teacher, into the table
            new = ~self.filled[b.idx, b.variant]
            if new.any():
                with torch.no_grad(), self.amp:
                    self.table[b.idx[new], b.variant[new]] = self.teacher(nhwc(b.x[new])).float()
                self.filled[b.idx[new], b.variant[new]] = True
        source = None
        if b.xs is not None:
            with torch.no_grad(), self.amp:
                source = self.teacher(nhwc(b.xs)).float()
        return TeacherView(self.table[b.idx, b.variant], source)


@dataclass
class Live(TeacherSource):
    """One teacher forward pass per batch over [target; source] images, shared by every student."""

    teacher: nn.Module
    taps: dict[str, FeatureTap]

    def __post_init__(self) -> None:
        self.amp = autocast(next(self.teacher.parameters()).device)[0]

    def __call__(self, b: Batch) -> TeacherView:
        with torch.no_grad(), self.amp:
            xt = torch.cat([b.x, b.xs]) if b.xs is not None else b.x
            logits = self.teacher(nhwc(xt)).float()  # (B or 2B, K)
        n = len(b.x)
        source = logits[n:] if b.xs is not None else None
        return TeacherView(logits[:n], source, {layer: tap.value for layer, tap in self.taps.items()})


def teacher_source(
    teacher: nn.Module | None,
    taps: dict[str, FeatureTap],
    normalizer: Normalizer,
    train_x: torch.Tensor,
    source_x: torch.Tensor | None,
    augment: str,
    given: TeacherOutputs | None = None,
) -> TeacherSource:
    """The source of a distilling run's teacher outputs (see the module's docstring). `taps` are the hint
    layers the students need, hooked on the teacher; `train_x`/`source_x` the uint8 transfer images on the
    device (`source_x` None when no transfer set uses source images); `given` outputs computed earlier for
    this teacher and data, used when they fit this run (same augmentation, the splits it needs)."""
    if augment == "none":
        source = _cached(teacher, taps, normalizer, train_x, source_x, given)
    elif taps:  # hint losses need the teacher's features on every drawn crop: no table
        source = None
    elif given is not None and given.augment == augment:
        source = Table(given.target.to(train_x.device), teacher)
    elif teacher is not None:
        shape = table_shape(teacher, normalizer, train_x, augment)
        empty = torch.empty(shape, device=next(teacher.parameters()).device) if shape else None
        filled = torch.zeros(shape[:2], dtype=torch.bool, device=train_x.device) if shape else None
        source = Table(empty, teacher, filled) if shape else None
    else:
        source = None
    needs_teacher = source is None or isinstance(source, Table) and source_x is not None
    if needs_teacher and teacher is None:
        raise ValueError(
            f"augment={augment!r}: the teacher's outputs are not all in teacher_outputs, so the teacher is needed"
        )
    return source or Live(teacher, taps)


def _cached(
    teacher: nn.Module | None,
    taps: dict[str, FeatureTap],
    normalizer: Normalizer,
    train_x: torch.Tensor,
    source_x: torch.Tensor | None,
    given: TeacherOutputs | None,
) -> Cached | None:
    """Outputs for every transfer image, once: `given` when it has what this run needs, plus one teacher pass
    for what it lacks. None when some hint layer's features would not fit in FEATURE_CACHE_BYTES: the teacher
    then runs per batch (`Live`)."""
    if given is not None and (given.is_table or source_x is not None and given.source is None):
        given = None  # computed for another augmentation, or no logits for the source images
    known = given.features if given else {}
    rows = len(train_x) + (len(source_x) if source_x is not None else 0)
    missing = [layer for layer in taps if layer not in known]
    if any(feature_bytes(teacher, normalizer, train_x, taps[layer]) * rows > FEATURE_CACHE_BYTES for layer in missing):
        return None
    if given is None and teacher is None:
        return None
    fresh = None
    if given is None or missing:  # one teacher pass gives the logits and every missing hint layer's features
        fresh = compute_teacher_outputs(teacher, normalizer, "", train_x, source_x, tuple(missing))
    base = given or fresh
    device = train_x.device
    outputs = TeacherOutputs(  # a device copy: the caller's outputs stay as they were
        base.key,
        base.target.to(device),
        base.source.to(device) if source_x is not None else None,
        {**known, **(fresh.features if fresh else {})},
    )
    return Cached(outputs, tuple(taps))
