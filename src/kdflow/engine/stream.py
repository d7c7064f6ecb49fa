"""The data stream of one training run: every epoch's batches, drawn once and shared by all its students.

Images live on the training device as uint8; each batch is sliced, augmented, normalised and put in the
students' memory format there. Under DDP every rank draws the whole global batch (so every rank's generator
stays in step) and keeps its share, `batch[rank::world]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kdflow.data.augment import augment, augment_with_variant
from kdflow.data.dataset import ImageSet, Normalizer
from kdflow.engine import ddp
from kdflow.engine.device import nhwc


@dataclass
class Batch:
    """This rank's part of one global batch: labelled target images and, when the stream has them, as many
    source images (the transfer set's unlabelled part)."""

    x: torch.Tensor  # (B, C, H, W): normalised target images
    y: torch.Tensor  # (B,)
    idx: torch.Tensor  # (B,): their rows in the target training split
    variant: torch.Tensor | None  # (B,): their augmentation variant (`augment_with_variant`), None without
    weight: float | None  # this rank's weight of the mean loss under DDP (`ddp.share`), None without DDP
    xs: torch.Tensor | None = None  # (B, C, H, W): normalised source images
    src_idx: torch.Tensor | None = None  # (B,): their rows in the source training split


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of each batch of an epoch over `n` shuffled samples. A last batch of a single sample joins
    the one before it: BatchNorm cannot normalise one sample where a layer's output is 1×1 (a resnet18 on small
    images fails with "Expected more than 1 value per channel"), and a one-sample step is mostly noise."""
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def epoch_size(epoch_over: str, target: int, source: int | None, uses_source: bool) -> int:
    """Samples an epoch covers (`TrainConfig.epoch_over`): the target split's `target`, or the larger of it and the
    source split's `source` ("transfer": when the stream carries source images; "source": whenever they are
    known)."""
    if source is None or epoch_over == "target" or (epoch_over == "transfer" and not uses_source):
        return target
    return max(target, source)


@dataclass
class Stream:
    """The target training split (and the source one, when a transfer set uses it) on the training device."""

    train: ImageSet
    source: ImageSet | None
    normalizer: Normalizer
    batch_size: int
    augment: str
    channels_last: bool  # the students' memory format (see `nhwc`)
    size: int | None = None  # target samples an epoch (`epoch_size`); None: one pass over the target split

    def __post_init__(self) -> None:
        self.size = max(self.size or 0, len(self.train))
        self.bounds = batch_bounds(self.size, self.batch_size)

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        return len(self.bounds)

    def epoch(self, gen: torch.Generator) -> Iterator[Batch]:
        """One epoch's batches: a shuffle of the target split (and of the source split; when the source split is
        the larger and the epoch covers it, further shuffles of the target split follow back to back), then per
        batch the augmentation draws, in this order, from `gen`."""
        device = self.train.x.device
        rank, world = ddp.rank(), ddp.world_size()
        n = len(self.train)
        order = torch.randperm(n, generator=gen, device=device)
        src_order = None
        if self.source is not None:
            src_order = torch.randperm(len(self.source), generator=gen, device=device)
        if self.size > n:  # each target image once per pass over it, as many passes as the epoch spans
            more = [torch.randperm(n, generator=gen, device=device) for _ in range(-(-self.size // n) - 1)]
            order = torch.cat([order, *more])[: self.size]
        if world > 1:  # identical already (same seed); broadcast so no device difference can split the ranks
            ddp.broadcast_(order)
            if src_order is not None:
                ddp.broadcast_(src_order)
        for lo, hi in self.bounds:
            idx = order[lo:hi]
            share, weight = ddp.share(len(idx), rank, world, device)
            xb_u8, variant = augment_with_variant(self.train.x[idx], self.augment, gen)
            batch = Batch(
                x=self._ready(ddp.take(xb_u8, share)),
                y=ddp.take(self.train.y[idx], share),
                idx=ddp.take(idx, share),
                variant=ddp.take(variant, share) if variant is not None else None,
                weight=weight,
            )
            if src_order is not None:  # as many source images, cycling through the source split's shuffle
                j = (torch.arange(len(idx), device=device) + lo) % len(self.source)
                batch.src_idx = ddp.take(src_order[j], share)
                batch.xs = self._ready(ddp.take(augment(self.source.x[src_order[j]], self.augment, gen), share))
            yield batch

    def _ready(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = self.normalizer(x_u8)  # (B, C, H, W) float
        return nhwc(x) if self.channels_last else x
