"""DistributedDataParallel helpers for the training loop: the process group's size and rank, collectives, and
each rank's share of a global batch. Outside a process group (world size 1, rank 0) every helper is a no-op
or the identity, so the single-process path is the plain code. Starting workers is the teacher step's job
(`kdflow.steps.teacher_ddp`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, the only process that logs and writes files (always true without a process group)."""
    return rank() == 0


def wrap(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """`module` (already on `device`) in DDP: rank 0's parameters and buffers are broadcast now, gradients are
    averaged across ranks in every backward pass."""
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP syncs them before each training
    forward, so after an epoch's last step they differ per rank; validation and the kept state must not."""
    with torch.no_grad():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite `tensor` in place with rank 0's and return it."""
    dist.broadcast(tensor, src=0)
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (any picklable value) on every rank; `obj` itself without a group."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0; None on the others. `[obj]` without a group."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-key sums over all ranks; every rank must pass the same keys."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def use_sync_batchnorm(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """Swap every BatchNorm layer of `model` for a SyncBatchNorm sharing its tensors, so batch statistics cover
    the whole global batch as on one GPU (CUDA only: torch's SyncBatchNorm has no CPU kernel). Returns the swaps
    for `restore_batchnorm`."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                sync = nn.SyncBatchNorm.convert_sync_batchnorm(child)
                setattr(parent, name, sync)
                swaps.append((parent, name, child, sync))
    return swaps


def restore_batchnorm(swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]]) -> None:
    """Put the original BatchNorm layers back with the trained values: checkpoints, pruning and the exported
    serving model expect plain BatchNorm."""
    for parent, name, original, sync in reversed(swaps):
        original.load_state_dict(sync.state_dict())
        original.train(sync.training)
        setattr(parent, name, original)


def share(batch: int, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor | None, float | None]:
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


def take(x: torch.Tensor, share: torch.Tensor | None) -> torch.Tensor:
    return x if share is None else x[share]
