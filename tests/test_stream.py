"""The data stream's epoch length: a pass over the target split, or over the transfer set when source images
carry the teacher's signal."""

from __future__ import annotations

from collections import Counter

import torch

from kdflow.engine.stream import Stream, epoch_size
from tests.helpers.quadrants import NORM, SOURCE, TRAIN, quadrants

BIG_SOURCE = quadrants(500, 4)


def _epoch(stream: Stream, seed: int = 0):
    return list(stream.epoch(torch.Generator().manual_seed(seed)))


def test_an_epoch_over_the_transfer_set_covers_every_source_image_once():
    """500 source images, 200 target images, batches of 64: 8 batches (the last of 52); every source image once,
    every target image 2 or 3 times (500 = 2.5 passes over the target split)."""
    stream = Stream(TRAIN, BIG_SOURCE, NORM, 64, "none", False, 500)
    batches = _epoch(stream)
    assert len(stream) == len(batches) == 8
    assert [len(b.idx) for b in batches] == [64] * 7 + [52]
    src = torch.cat([b.src_idx for b in batches])
    assert sorted(src.tolist()) == list(range(500))
    seen = Counter(torch.cat([b.idx for b in batches]).tolist())
    assert set(seen) == set(range(200)) and set(seen.values()) == {2, 3}
    assert sum(v == 3 for v in seen.values()) == 100  # the third pass is half done


def test_an_epoch_over_the_target_split_is_the_same_stream_as_before():
    """`epoch_over: target` (and a source split smaller than the target one, for `transfer`) draws the target
    shuffle, then the source shuffle: batches over the 200 target images, the source split cycled."""
    for over, source in (("target", BIG_SOURCE), ("transfer", SOURCE)):
        stream = Stream(TRAIN, source, NORM, 64, "none", False, epoch_size(over, 200, len(source), True))
        batches = _epoch(stream)
        gen = torch.Generator().manual_seed(0)
        order, src_order = torch.randperm(200, generator=gen), torch.randperm(len(source), generator=gen)
        assert len(stream) == 4 and torch.equal(torch.cat([b.idx for b in batches]), order)
        assert torch.equal(torch.cat([b.src_idx for b in batches]), src_order[torch.arange(200) % len(source)])


def test_without_source_images_the_epoch_is_the_target_split():
    stream = Stream(TRAIN, None, NORM, 64, "none", False, None)
    assert len(stream) == 4 and sorted(torch.cat([b.idx for b in _epoch(stream)]).tolist()) == list(range(200))


def test_epoch_sizes():
    assert [epoch_size("transfer", 200, 500, u) for u in (True, False)] == [500, 200]
    assert [epoch_size("source", 200, 500, u) for u in (True, False)] == [500, 500]
    assert [epoch_size("target", 200, 500, u) for u in (True, False)] == [200, 200]
    assert epoch_size("source", 200, None, False) == 200 and epoch_size("transfer", 200, 50, True) == 200


class TrainingSteps(torch.nn.Module):
    """A student that counts its training-mode forward passes: one per optimizer step."""

    def __init__(self, net):
        super().__init__()
        self.net, self.steps = net, 0

    def forward(self, x):
        self.steps += self.training
        return self.net(x)


def test_an_epoch_over_the_source_split_gives_target_only_students_as_many_steps():
    """A plain-CE student handed a 500-image source split: 8 steps an epoch (500 / 64) with `epoch_over: source`,
    4 (the 200 target images) with `transfer`, since it uses no source images."""
    from kdflow.config import LossConfig
    from kdflow.engine.loop import Student, fit_many
    from tests.helpers.quadrants import CPU, VAL, cfg, cnn

    steps = {}
    for over in ("source", "transfer", "target"):
        model = TrainingSteps(cnn(4))
        student = Student(model, LossConfig(name="ce", kind="ce"))
        fit_many([student], TRAIN, VAL, cfg(2, batch_size=64, epoch_over=over), NORM, seed=0, device=CPU,
                 source=BIG_SOURCE)  # fmt: skip
        steps[over] = model.steps
    assert steps == {"source": 16, "transfer": 8, "target": 8}
