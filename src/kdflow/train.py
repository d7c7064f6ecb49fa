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
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdflow import distributed
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


def augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Batched tensor augmentation on uint8 (B, C, H, W): random crop after zero padding of H/8, and/or a
    horizontal flip, each sample drawing its own offsets from `gen`."""
    if kind == "none":
        return x
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    if kind == "crop_flip":
        flip = torch.rand(b, generator=gen, device=gen.device).to(x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


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
) -> FitResult:
    """Train `model` in place and leave it holding its best-validation weights (accuracy, then lower loss).

    `loss` defaults to plain cross-entropy. With a teacher, the distillation terms use the transfer set that
    `loss.transfer` names: the target batch itself, a batch of `source` images, or both concatenated.
    `hint_layers` = (student layer, teacher layer) for feature-hint objectives.

    Under torch.distributed with several processes (`kdflow.distributed`), `model` (and a hint adapter) train in
    DistributedDataParallel: every rank draws the same global batch of `cfg.batch_size` and trains on
    `batch[rank::world]`, its loss weighted so the averaged gradient is the global batch's, so one optimizer
    step still consumes one global batch. BatchNorm uses SyncBatchNorm on CUDA (torch has no CPU kernel for it;
    on CPU each rank normalises its share and rank 0's running statistics are kept). Rank 0 validates and its
    numbers reach every rank, so all ranks keep the same epoch and end with identical weights; only rank 0 calls
    `on_epoch`. The teacher is never wrapped: it is frozen and each rank runs it forward on its own share.
    """
    loss = loss or LossConfig(name="ce", kind="ce")
    if isinstance(teacher, nn.parallel.DistributedDataParallel):
        raise ValueError("the teacher is frozen and only runs forward: pass the bare module, not a DDP wrapper")
    if needs_teacher(loss) and teacher is None:
        raise ValueError(f"loss {loss.name!r} ({loss.kind}) needs a teacher")
    if loss.kind == "hint" and hint_layers is None:
        raise ValueError(f"loss {loss.name!r} (hint) needs hint_layers=(student layer, teacher layer)")
    use_source = uses_source_data(loss)
    if use_source and source is None:
        raise ValueError(f"loss {loss.name!r} uses transfer={loss.transfer!r} but no source data was given")
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    seed_everything(seed)
    model.to(device)
    normalizer = normalizer.to(device)
    train, val = train.to(device), val.to(device)
    if use_source:
        source = source.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    sync_bn = distributed.use_sync_batchnorm(model) if world > 1 and device.type == "cuda" else []
    taps, adapter = None, None
    if loss.kind == "hint":
        s_tap, t_tap = _FeatureTap(model, hint_layers[0]), _FeatureTap(teacher, hint_layers[1])
        taps = (s_tap, t_tap)
        with torch.no_grad():  # one probe batch tells the adapter its channel counts
            probe = normalizer(train.x[:2])
            model.eval()(probe)
            teacher(probe)
        adapter = HintAdapter(s_tap.value.shape[1], t_tap.value.shape[1]).to(device)

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
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    amp, scaler = _autocast(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    init_acc, init_loss = _validate(model, val, normalizer, world)
    best = FitResult(best_epoch=0, best_val_acc=init_acc)
    best_key = (init_acc, -init_loss)
    best_state = copy.deepcopy(model.state_dict())
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        order = torch.randperm(len(train), generator=gen, device=device)
        src_order = torch.randperm(len(source), generator=gen, device=device) if use_source else None
        if world > 1:  # identical already (same seed); broadcast so no device difference can split the ranks
            distributed.broadcast_(order)
            if use_source:
                distributed.broadcast_(src_order)
        sums: dict[str, float] = {}
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            share, weight = _share(len(idx), rank, world, device)
            # the whole global batch is augmented on every rank, so every rank's generator stays in step
            xb = normalizer(_take(augment(train.x[idx], cfg.augment, gen), share))  # (B, C, H, W)
            yb = _take(train.y[idx], share)
            with amp:
                if use_source:
                    j = (torch.arange(len(idx), device=device) + i * cfg.batch_size) % len(source)
                    xs = normalizer(_take(augment(source.x[src_order[j]], cfg.augment, gen), share))
                    xt = xs if loss.transfer == "source" else torch.cat([xb, xs])
                    out = net(torch.cat([xb, xs]))  # one student pass over labelled + transfer images
                    logits = out[: len(xb)]
                    s_transfer = out[len(xb) :] if loss.transfer == "source" else out
                else:
                    xt = xb
                    logits = s_transfer = net(xb)  # (B, K)
                s_feat = taps[0].value if taps else None
                t_logits = t_feat = None
                if teacher is not None and needs_teacher(loss):
                    with torch.no_grad():
                        t_logits = teacher(xt)  # (B', K)
                    t_feat = taps[1].value if taps else None
                    if taps and s_feat.shape[0] != t_feat.shape[0]:  # student saw labelled + source images
                        s_feat = s_feat[len(xb) :]
                adapted = net_adapter(s_feat, t_feat.shape[-2:]) if adapter else None
                total, parts = objective(loss, logits, yb, s_transfer, t_logits, adapted, t_feat)
            scaled = total if weight is None else total * weight  # DDP averages: Σ_ranks share/batch · mean
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(scaled).backward()
                scaler.step(opt)
                scaler.update()
            else:
                scaled.backward()
                opt.step()
            sched.step()
            for k, v in [*parts.items(), ("loss", float(total.detach()))]:  # DDP: this rank's part of the mean
                sums[k] = sums.get(k, 0.0) + (v if weight is None else v * weight / world)

        if world > 1:
            sums = distributed.all_reduce_sums(sums, device)  # global-batch means, as on one process
            distributed.broadcast_buffers(model)  # every rank validates and keeps rank 0's statistics
        metrics = {f"train_{k}": v / steps_per_epoch for k, v in sums.items()}
        metrics["val_acc"], metrics["val_loss"] = _validate(model, val, normalizer, world)
        metrics["lr"] = sched.get_last_lr()[0]
        best.history.append(metrics)
        key = (metrics["val_acc"], -metrics["val_loss"])  # small val sets saturate: ties go to the lower loss
        if key > best_key:
            best_key, best.best_epoch, best.best_val_acc = key, epoch, metrics["val_acc"]
            best_state = copy.deepcopy(model.state_dict())
        if on_epoch and rank == 0:
            on_epoch(epoch, metrics)
    if taps:
        for t in taps:
            t.close()
    model.load_state_dict(best_state)
    distributed.restore_batchnorm(sync_bn)
    return best


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
