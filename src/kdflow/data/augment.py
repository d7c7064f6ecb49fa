"""Batched random augmentation of uint8 image tensors on their device: a random crop after zero padding and a
horizontal flip, each sample drawing its own offsets. Each result has a *variant* index, so a table of the
teacher's outputs per variant (`kdflow.engine.teacher_outputs`) can be looked up instead of recomputed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
