"""One training loop for pretraining, fine-tuning and distillation.

Datasets here are small enough to live as uint8 tensors on the training device; batches are sliced from them
and normalised (and augmented) on the device, so no DataLoader workers or per-sample PIL transforms sit in the
hot path. A teacher, when given, is frozen in eval mode and only ever runs under `torch.no_grad()`.
The best epoch on the validation split is kept: test data never steers training.

Inside a torchrun worker (`kdflow.distributed`) the same loop trains data-parallel: the model is wrapped in
DistributedDataParallel and each rank trains on its share of every global batch.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdflow import distributed, malloc
from kdflow.config import LossConfig, TrainConfig
from kdflow.data import Normalizer
from kdflow.losses import HintAdapter, needs_teacher, objective, uses_source_data


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → CUDA when present, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Split:
    """One split held as tensors: uint8 images (N, C, H, W) and int64 labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def to(self, device: torch.device) -> Split:
        pin = device.type == "cuda"
        x, y = (self.x.pin_memory(), self.y.pin_memory()) if pin else (self.x, self.y)
        return Split(x.to(device, non_blocking=pin), y.to(device, non_blocking=pin))

    def __len__(self) -> int:
        return len(self.y)


def crop_padding(size: int) -> int:
    """Zero padding (pixels per side) of the random crop for images of `size` px: size/8, at least 1."""
    return max(1, size // 8)


def augment_variants(kind: str, size: int) -> int:
    """How many distinct images `augment` can make of one `size`-px image: every crop offset, times 2 with flips."""
    if kind == "none":
        return 1
    offsets = (2 * crop_padding(size) + 1) ** 2
    return 2 * offsets if kind == "crop_flip" else offsets


def augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Batched tensor augmentation on uint8 (B, C, H, W): random crop after zero padding of H/8, and/or a
    horizontal flip, each sample drawing its own offsets from `gen`."""
    return augment_with_variant(x, kind, gen)[0]


def augment_with_variant(x: torch.Tensor, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`augment`, plus each sample's variant index in [0, augment_variants): (dy·(2·pad+1) + dx), times 2 plus the
    flip bit for crop_flip. The index addresses a table of teacher outputs per variant (`compute_teacher_outputs`);
    the images and the draws from `gen` are exactly those of `augment`."""
    if kind == "none":
        return x, None
    b, _, h, w = x.shape
    pad = crop_padding(h)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    variant = dy * (2 * pad + 1) + dx
    if kind == "crop_flip":
        flip = torch.rand(b, generator=gen, device=gen.device).to(x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        variant = variant * 2 + flip.long()
    return out.contiguous(), variant


def augment_variant(x: torch.Tensor, kind: str, variant: int) -> torch.Tensor:
    """Every image of uint8 `x` (B, C, H, W) under one augmentation variant (an index of `augment_with_variant`)."""
    h, w = x.shape[-2:]
    if not 0 <= variant < augment_variants(kind, h):
        raise ValueError(f"augmentation variant {variant} out of range for {kind!r} on {h}-px images")
    if kind == "none":
        return x
    pad = crop_padding(h)
    flip = False
    if kind == "crop_flip":
        variant, flip = divmod(variant, 2)
    dy, dx = divmod(variant, 2 * pad + 1)
    out = F.pad(x, (pad, pad, pad, pad))[..., dy : dy + h, dx : dx + w]
    return (out.flip(-1) if flip else out).contiguous()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, normalizer: Normalizer, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, K) for uint8 images, in eval mode, on the model's device; returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    normalizer = normalizer.to(device)
    out = [model(normalizer(x[i : i + batch_size].to(device))).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y.cpu()).float().mean())


class _FeatureTap:
    """Keeps the latest output of one submodule (a forward hook), for feature hints."""

    def __init__(self, model: nn.Module, layer: str):
        self.value: torch.Tensor | None = None
        self.handle = model.get_submodule(layer).register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output) -> None:
        self.value = output

    def close(self) -> None:
        self.handle.remove()


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float
    history: list[dict[str, float]] = field(default_factory=list)


def _autocast(device: torch.device) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
    """bf16 autocast on GPUs that support it, fp16 with a GradScaler on older ones, nothing on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


@dataclass
class Student:
    """One candidate for `fit_many`: a model, its objective, (hint losses) the student and teacher layers to
    match, and a per-epoch callback."""

    model: nn.Module
    loss: LossConfig = field(default_factory=lambda: LossConfig(name="ce", kind="ce"))
    hint_layers: tuple[str, str] | None = None
    on_epoch: Callable[[int, dict[str, float]], None] | None = None


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


FEATURE_CACHE_BYTES = 1 << 30  # teacher hint features larger than this are recomputed per batch instead
TABLE_BYTES = 256 << 20  # teacher-output tables of augmented images larger than this are not built


def teacher_outputs_key(teacher: nn.Module, data_hash: str) -> str:
    """sha256 over the teacher's weights and the dataset's content hash."""
    import hashlib

    h = hashlib.sha256(data_hash.encode())
    for name, t in teacher.state_dict().items():
        h.update(name.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """An image batch in channels_last memory. NHWC convolutions use tensor cores on CUDA, where everything runs
    in it. On the CPU only the frozen teacher does: oneDNN runs its inference about 1.3× faster in NHWC, while
    narrow students (8 channels) train about 15% slower in it than in NCHW."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


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
    if device.type == "cpu":
        malloc.keep_freed_blocks()
    teacher.eval()
    if target.dim() == 4:
        teacher.to(memory_format=torch.channels_last)
    normalizer = normalizer.to(device)
    amp, _ = _autocast(device)
    taps = {layer: _FeatureTap(teacher, layer) for layer in feature_layers}
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
                    per_variant.append(teacher(_nhwc(xv)).float())
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
        or not _table_shape(teacher, normalizer, images, augment)
    ):
        return None
    return compute_teacher_outputs(teacher, normalizer, key, images, augment=augment)


def _table_shape(
    teacher: nn.Module, normalizer: Normalizer, images: torch.Tensor, augment: str
) -> tuple[int, int, int] | None:
    """(N, V, K) of a table of teacher logits for every augmentation variant of `images`, or None when it would
    not fit in TABLE_BYTES. One image through the teacher tells the class count K."""
    device = next(teacher.parameters()).device
    with torch.no_grad():
        num_classes = teacher.eval()(normalizer.to(device)(images[:1].to(device))).shape[1]
    shape = (len(images), augment_variants(augment, images.shape[-2]), num_classes)
    return shape if shape[0] * shape[1] * shape[2] * 4 <= TABLE_BYTES else None


def _empty_table(teacher: nn.Module, normalizer: Normalizer, images: torch.Tensor, augment: str) -> torch.Tensor | None:
    """An unfilled table (`_table_shape`) on the teacher's device, or None. Filled as the crops are drawn, it runs
    the teacher on each (image, variant) at most once: never more often than per batch, and less as epochs
    repeat crops (25 epochs over 25 variants draw about 64% of the pairs)."""
    shape = _table_shape(teacher, normalizer, images, augment)
    return torch.empty(shape, device=next(teacher.parameters()).device) if shape else None


class _RngSlot:
    """Each student's own global-RNG stream (dropout and the like), so training K students side by side draws
    exactly what training each alone would."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def active(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            if self.cuda is not None:
                self.cuda = torch.cuda.get_rng_state(self.device)


@dataclass
class _Run:
    """Everything one student carries through `fit_many`."""

    spec: Student
    net: nn.Module
    adapter: nn.Module | None
    net_adapter: nn.Module | None
    tap: _FeatureTap | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    rng: _RngSlot
    sync_bn: list
    result: FitResult
    best_key: tuple[float, float]
    best_state: dict
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    normalizer: Normalizer,
    *,
    seed: int,
    device: torch.device,
    loss: LossConfig | None = None,
    teacher: nn.Module | None = None,
    source: Split | None = None,
    hint_layers: tuple[str, str] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    teacher_outputs: TeacherOutputs | None = None,
) -> FitResult:
    """Train `model` in place and leave it holding its best-validation weights (accuracy, then lower loss).

    `loss` defaults to plain cross-entropy. With a teacher, the distillation terms use the transfer set that
    `loss.transfer` names: the target batch itself, a batch of `source` images, or both concatenated.
    `hint_layers` = (student layer, teacher layer) for feature-hint objectives. One student of `fit_many`.
    """
    student = Student(model, loss or LossConfig(name="ce", kind="ce"), hint_layers, on_epoch)
    return fit_many(
        [student],
        train,
        val,
        cfg,
        normalizer,
        seed=seed,
        device=device,
        teacher=teacher,
        source=source,
        teacher_outputs=teacher_outputs,
    )[0]


def fit_many(
    students: list[Student],
    train: Split,
    val: Split,
    cfg: TrainConfig,
    normalizer: Normalizer,
    *,
    seed: int,
    device: torch.device,
    teacher: nn.Module | None = None,
    source: Split | None = None,
    teacher_outputs: TeacherOutputs | None = None,
) -> list[FitResult]:
    """Train several students over one data stream, sharing each batch's teacher pass; every student ends
    holding its best-validation weights. Each student gets exactly the batches, augmentation, initial RNG state
    and optimizer it would get from `fit` alone with the same seed, so the results equal training them one by
    one. The students must agree on whether their transfer set includes source images (one stream).

    Without random augmentation (`cfg.augment == "none"`) the teacher's outputs are computed once, before the
    first epoch, and looked up per batch (or taken from `teacher_outputs`, computed earlier for this teacher and
    data). With random crops they are looked up in a table over every crop variant (`TeacherOutputs`): taken
    from `teacher_outputs`, or else filled here as the crops are drawn, so the teacher runs once per (image,
    crop) the epochs draw, never more often than per batch. Without room for the table (TABLE_BYTES), and
    whenever a hint loss needs the teacher's features, the teacher runs on every batch.

    Under torch.distributed with several processes (`kdflow.distributed`), each student (and hint adapter)
    trains in DistributedDataParallel: every rank draws the same global batch of `cfg.batch_size` and trains on
    `batch[rank::world]`, its loss weighted so the averaged gradient is the global batch's, so one optimizer
    step still consumes one global batch. BatchNorm uses SyncBatchNorm on CUDA (torch has no CPU kernel for it;
    on CPU each rank normalises its share and rank 0's running statistics are kept). Rank 0 validates and its
    numbers reach every rank, so all ranks keep the same epoch and end with identical weights; only rank 0 calls
    `on_epoch`. The teacher is never wrapped: it is frozen and each rank runs it forward on its own share.
    """
    if not students:
        raise ValueError("fit_many needs at least one student")
    if device.type == "cpu":
        malloc.keep_freed_blocks()
    if isinstance(teacher, nn.parallel.DistributedDataParallel):
        raise ValueError("the teacher is frozen and only runs forward: pass the bare module, not a DDP wrapper")
    for s in students:
        if needs_teacher(s.loss) and teacher is None and teacher_outputs is None:
            raise ValueError(f"loss {s.loss.name!r} ({s.loss.kind}) needs a teacher")
        if s.loss.kind == "hint" and (s.hint_layers is None or teacher is None):
            raise ValueError(f"loss {s.loss.name!r} (hint) needs a teacher and hint_layers=(student, teacher layer)")
    streams = {uses_source_data(s.loss) for s in students}
    if len(streams) > 1:
        raise ValueError("students trained together must agree on using source data; train the groups apart")
    use_source = streams.pop()
    if use_source and source is None:
        names = [s.loss.name for s in students]
        raise ValueError(f"losses {names} use source images in their transfer set but no source data was given")
    distilling = [s for s in students if needs_teacher(s.loss)]
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    channels_last = device.type == "cuda" and train.x.dim() == 4  # the students' memory format: see _nhwc

    seed_everything(seed)
    normalizer = normalizer.to(device)
    train, val = train.to(device), val.to(device)
    if use_source:
        source = source.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if train.x.dim() == 4:
            teacher.to(memory_format=torch.channels_last)  # on every device: see _nhwc
    t_layers = sorted({s.hint_layers[1] for s in distilling if s.loss.kind == "hint"})
    t_taps = {layer: _FeatureTap(teacher, layer) for layer in t_layers}

    # teacher outputs once for the whole run, when every epoch shows the students the same images
    cached = table = None
    if distilling and cfg.augment == "none":
        given = teacher_outputs if teacher_outputs is not None and teacher_outputs.augment == "none" else None
        if given is not None and use_source and given.source is None:
            given = None  # no logits for the source images: compute them all here
        known = given.features if given else {}
        rows = len(train) + (len(source) if use_source else 0)
        layers = tuple(
            layer
            for layer in t_layers
            if layer not in known
            and _feature_bytes(teacher, normalizer, train.x, t_taps[layer]) * rows <= FEATURE_CACHE_BYTES
        )
        # one teacher pass gives the logits and every hint layer's features that fit in memory
        fresh = None
        if given is None or layers:
            fresh = compute_teacher_outputs(teacher, normalizer, "", train.x, source.x if use_source else None, layers)
        base = given or fresh
        cached = TeacherOutputs(  # a device copy: the caller's outputs stay as they were
            base.key,
            base.target.to(device),
            base.source.to(device) if use_source else None,
            {**known, **(fresh.features if fresh else {})},
        )
    # with random crops: one table over every crop variant of every target image (hints need features: no table).
    # Given (the teacher step's), it is complete; else it starts empty and each (image, crop) the epochs draw is
    # run through the teacher once, the first time it is drawn (`filled` marks those)
    filled = None
    if distilling and cfg.augment != "none" and not t_layers:
        if teacher_outputs is not None and teacher_outputs.augment == cfg.augment:
            table = teacher_outputs.target.to(device)  # (N, V, K)
        elif teacher is not None:
            table = _empty_table(teacher, normalizer, train.x, cfg.augment)
            filled = torch.zeros(table.shape[:2], dtype=torch.bool, device=device) if table is not None else None
    if distilling and teacher is None and (cached is None and table is None or use_source and table is not None):
        raise ValueError(
            f"augment={cfg.augment!r}: the teacher's outputs are not all in teacher_outputs, so the teacher is needed"
        )

    amp, _ = _autocast(device)
    batches = batch_bounds(len(train), cfg.batch_size)
    steps_per_epoch = len(batches)
    runs: list[_Run] = []
    for s in students:
        seed_everything(seed)  # the state `fit` alone would start this student from
        model = s.model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        sync_bn = distributed.use_sync_batchnorm(model) if world > 1 and device.type == "cuda" else []
        tap = adapter = None
        if s.loss.kind == "hint":
            tap = _FeatureTap(model, s.hint_layers[0])
            t_tap = t_taps[s.hint_layers[1]]
            with torch.no_grad():  # one probe batch tells the adapter its channel counts
                probe = normalizer(train.x[:2])
                model.eval()(probe)
                teacher(probe)
            adapter = HintAdapter(tap.value.shape[1], t_tap.value.shape[1]).to(device)
        net, net_adapter = model, adapter  # what the training step calls: DDP wrappers under torch.distributed
        if world > 1:
            net = distributed.wrap(model, device)
            net_adapter = distributed.wrap(adapter, device) if adapter else None
        params = list(model.parameters()) + (list(adapter.parameters()) if adapter else [])
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
            )
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
        init_acc, init_loss = _validate(model, val, normalizer, world)
        runs.append(
            _Run(
                spec=s,
                net=torch.compile(net) if cfg.compile else net,
                adapter=adapter,
                net_adapter=net_adapter,
                tap=tap,
                opt=opt,
                sched=sched,
                scaler=_autocast(device)[1],
                rng=_RngSlot(device),
                sync_bn=sync_bn,
                result=FitResult(best_epoch=0, best_val_acc=init_acc),
                best_key=(init_acc, -init_loss),
                best_state=copy.deepcopy(model.state_dict()),
            )
        )

    gen = torch.Generator(device=device).manual_seed(seed)
    for epoch in range(1, cfg.epochs + 1):
        for r in runs:
            r.net.train()
            r.sums = {}
        order = torch.randperm(len(train), generator=gen, device=device)
        src_order = torch.randperm(len(source), generator=gen, device=device) if use_source else None
        if world > 1:  # identical already (same seed); broadcast so no device difference can split the ranks
            distributed.broadcast_(order)
            if use_source:
                distributed.broadcast_(src_order)
        for lo, hi in batches:
            idx = order[lo:hi]
            share, weight = _share(len(idx), rank, world, device)
            # the whole global batch is augmented on every rank, so every rank's generator stays in step
            xb_u8, variant = augment_with_variant(train.x[idx], cfg.augment, gen)
            xb = normalizer(_take(xb_u8, share))  # (B, C, H, W)
            yb = _take(train.y[idx], share)
            xs = src_idx = None
            if use_source:
                j = (torch.arange(len(idx), device=device) + lo) % len(source)
                src_idx = _take(src_order[j], share)
                xs = normalizer(_take(augment(source.x[src_order[j]], cfg.augment, gen), share))
            if channels_last:
                xb = _nhwc(xb)
                xs = _nhwc(xs) if xs is not None else None
            # the teacher on the transfer images: looked up when cached, else one forward for all students
            t_out: dict[str, torch.Tensor | None] = {}
            t_feat: dict[str, torch.Tensor | None] = {}
            if distilling:
                b_idx = _take(idx, share)
                if cached is not None:
                    t_out["target"] = cached.target[b_idx]
                    t_out["source"] = cached.source[src_idx] if use_source else None
                    for layer in t_layers:
                        if layer in cached.features:
                            f = cached.features[layer]
                            t_feat[layer] = (
                                torch.cat([f["target"][b_idx], f["source"][src_idx]])
                                if use_source
                                else f["target"][b_idx]
                            )
                elif table is not None:  # this batch's crops, looked up; source images go through the teacher
                    b_var = _take(variant, share)
                    if filled is not None:  # crops drawn for the first time: through the teacher, into the table
                        new = ~filled[b_idx, b_var]
                        if new.any():
                            with torch.no_grad(), amp:
                                table[b_idx[new], b_var[new]] = teacher(_nhwc(xb[new])).float()
                            filled[b_idx[new], b_var[new]] = True
                    t_out["target"] = table[b_idx, b_var]
                    t_out["source"] = None
                    if use_source:
                        with torch.no_grad(), amp:
                            t_out["source"] = teacher(_nhwc(xs)).float()
                if len(t_out) == 0 or any(layer not in t_feat for layer in t_layers):
                    with torch.no_grad(), amp:
                        xt = torch.cat([xb, xs]) if use_source else xb
                        logits_t = teacher(_nhwc(xt)).float()  # (B or 2B, K)
                    t_out = {"target": logits_t[: len(xb)], "source": logits_t[len(xb) :] if use_source else None}
                    t_feat = {layer: tap.value for layer, tap in t_taps.items()}
            for r in runs:
                with r.rng.active():
                    _step(r, xb, yb, xs, t_out, t_feat, weight, amp)
        if world > 1:
            for r in runs:
                r.sums = distributed.all_reduce_sums({k: float(v) for k, v in r.sums.items()}, device)
                distributed.broadcast_buffers(r.spec.model)  # every rank validates and keeps rank 0's statistics
        for r in runs:
            metrics = {f"train_{k}": float(v) / steps_per_epoch for k, v in r.sums.items()}
            metrics["val_acc"], metrics["val_loss"] = _validate(r.spec.model, val, normalizer, world)
            metrics["lr"] = r.sched.get_last_lr()[0]
            r.result.history.append(metrics)
            key = (metrics["val_acc"], -metrics["val_loss"])  # small val sets saturate: ties go to the lower loss
            if key > r.best_key:
                r.best_key, r.result.best_epoch, r.result.best_val_acc = key, epoch, metrics["val_acc"]
                r.best_state = copy.deepcopy(r.spec.model.state_dict())
            if r.spec.on_epoch and rank == 0:
                r.spec.on_epoch(epoch, metrics)
    for tap in [*t_taps.values(), *(r.tap for r in runs if r.tap)]:
        tap.close()
    for r in runs:
        r.spec.model.load_state_dict(r.best_state)
        if channels_last:
            r.spec.model.to(memory_format=torch.contiguous_format)
        distributed.restore_batchnorm(r.sync_bn)
    return [r.result for r in runs]


def _step(r: _Run, xb, yb, xs, t_out: dict, t_feat: dict, weight: float | None, amp) -> None:
    """One optimizer step of one student on the shared batch: labelled target images `xb`/`yb`, source images
    `xs` when its transfer set uses them, teacher logits/features on those images in `t_out`/`t_feat`."""
    loss = r.spec.loss
    with amp:
        if xs is not None:
            out = r.net(torch.cat([xb, xs]))  # one student pass over labelled + transfer images
            logits = out[: len(xb)]
            s_transfer = out[len(xb) :] if loss.transfer == "source" else out
        else:
            logits = s_transfer = r.net(xb)  # (B, K)
        t_logits = teacher_feat = adapted = None
        if needs_teacher(loss):
            if loss.transfer == "target":
                t_logits = t_out["target"]
            elif loss.transfer == "source":
                t_logits = t_out["source"]
            else:
                t_logits = torch.cat([t_out["target"], t_out["source"]])
            if loss.kind == "hint":
                s_feat, teacher_feat = r.tap.value, t_feat[r.spec.hint_layers[1]]
                if loss.transfer == "source":  # student and teacher features on the source images only
                    s_feat, teacher_feat = s_feat[len(xb) :], teacher_feat[len(xb) :]
                adapted = r.net_adapter(s_feat, teacher_feat.shape[-2:])
        total, parts = objective(loss, logits, yb, s_transfer, t_logits, adapted, teacher_feat)
    scaled = total if weight is None else total * weight  # DDP averages: Σ_ranks share/batch · mean
    r.opt.zero_grad(set_to_none=True)
    if r.scaler is not None:
        r.scaler.scale(scaled).backward()
        r.scaler.step(r.opt)
        r.scaler.update()
    else:
        scaled.backward()
        r.opt.step()
    r.sched.step()
    world = distributed.world_size()
    for k, v in [*parts.items(), ("loss", total.detach())]:  # tensors: no device sync per step
        v = v if weight is None else v * (weight / world)  # DDP: this rank's part of the mean
        r.sums[k] = r.sums[k] + v if k in r.sums else v


def _feature_bytes(teacher: nn.Module, normalizer: Normalizer, x: torch.Tensor, tap) -> int:
    """Bytes of the tapped teacher layer's output for one image: tells what caching that layer would cost."""
    with torch.no_grad():
        teacher(normalizer(x[:1]))
    return tap.value.element_size() * tap.value[0].numel()


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of each batch of an epoch over `n` shuffled samples. A last batch of a single sample joins
    the one before it: BatchNorm cannot normalise one sample where a layer's output is 1×1 (a resnet18 on small
    images fails with "Expected more than 1 value per channel"), and a one-sample step is mostly noise."""
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _share(batch: int, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor | None, float | None]:
    """This rank's positions in a global batch of `batch` and the weight of its mean loss, so that DDP's
    average of the weighted losses' gradients is the gradient of the global batch's mean loss. (None, None)
    without DDP. A rank left without samples (a last batch smaller than the world) runs one sample at weight 0:
    every rank must take part in each backward pass."""
    if world == 1:
        return None, None
    share = torch.arange(rank, batch, world, device=device)
    if len(share) == 0:
        return torch.zeros(1, dtype=torch.long, device=device), 0.0
    return share, world * len(share) / batch


def _take(x: torch.Tensor, share: torch.Tensor | None) -> torch.Tensor:
    return x if share is None else x[share]


def _validate(model: nn.Module, val: Split, normalizer: Normalizer, world: int) -> tuple[float, float]:
    """(accuracy, cross-entropy) on the validation split. Under DDP rank 0 computes them and every rank gets
    rank 0's numbers, so all ranks make the same best-epoch choice."""
    result = None
    if world == 1 or distributed.is_main():
        logits = predict(model, val.x, normalizer)
        result = (accuracy(logits, val.y), float(F.cross_entropy(logits, val.y.cpu())))
    return result if world == 1 else distributed.broadcast_object(result)
