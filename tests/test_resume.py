"""Epoch checkpoints (`kdflow.engine.resume`): a fit stopped mid-training and started again continues from its
last checkpoint and ends with exactly the weights, history and best epoch of an uninterrupted fit."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdflow.config import LossConfig
from kdflow.engine.loop import Student, fit_many
from kdflow.engine.resume import Checkpoints, DirStore, global_rng_state, set_global_rng_state
from tests.helpers.quadrants import CPU, NORM, SOURCE, TRAIN, VAL, cfg, cnn, state

pytestmark = pytest.mark.usefixtures("one_thread")

KD = LossConfig(name="kd", kind="kd", temperature=4.0, alpha=0.9)
CE = LossConfig(name="ce", kind="ce")


class Killed(RuntimeError):
    """Stands for a kill mid-epoch: raised by a student's epoch callback."""


class Dropped(nn.Module):
    """Draws from the global RNG while training (dropout), so a resume must restore the RNG streams too."""

    def __init__(self):
        super().__init__()
        self.body = cnn(4, seed=3)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.body(x))


def _students(kill_at: int | None = None) -> list[Student]:
    def on_epoch(epoch, _metrics):
        if epoch == kill_at:
            raise Killed(f"killed in epoch {epoch}")

    return [Student(cnn(4, seed=1), KD, on_epoch=on_epoch), Student(Dropped(), CE)]


def _fit(students, teacher, checkpoints=None, augment="crop_flip"):
    config = cfg(6, augment=augment, patience=None)
    kw = dict(seed=0, device=CPU, teacher=teacher, source=SOURCE, checkpoints=checkpoints)
    return fit_many(students, TRAIN, VAL, config, NORM, **kw)


@pytest.mark.parametrize("kill_at", [2, 5])
def test_a_fit_killed_mid_training_resumes_to_identical_weights(teacher, tmp_path, kill_at):
    whole = _students()
    expected = _fit(whole, teacher)
    store = DirStore(tmp_path)
    with pytest.raises(Killed):  # every epoch end checkpoints: the one before the kill is the latest
        _fit(_students(kill_at), teacher, Checkpoints(store, "fit", every_s=0, max_share=float("inf")))
    assert json.loads((tmp_path / "fit" / "latest.json").read_text())["epoch"] == kill_at - 1
    again = _students()
    resumed = Checkpoints(store, "fit", every_s=0, max_share=float("inf"))
    results = _fit(again, teacher, resumed)
    assert resumed.resumed_from == kill_at - 1
    for r, e in zip(results, expected):
        assert r.history == e.history
        assert (r.best_epoch, r.best_val_acc, r.epochs) == (e.best_epoch, e.best_val_acc, e.epochs)
    for a, b in zip(again, whole):
        for k, v in state(b.model).items():
            assert torch.equal(a.model.state_dict()[k], v), k


def test_a_finished_fit_is_not_trained_again(teacher, tmp_path):
    store = DirStore(tmp_path)
    first = _students()
    done = Checkpoints(store, "fit", every_s=1e9)  # only the end: training-time checkpoints never due
    _fit(first, teacher, done)
    assert done.saved == 1
    calls = []
    again = [Student(cnn(4, seed=1), KD, on_epoch=lambda e, m: calls.append(e)), Student(Dropped(), CE)]
    reload = Checkpoints(store, "fit", every_s=1e9)
    _fit(again, teacher, reload)
    assert calls == [] and reload.resumed_from == 6 and reload.saved == 0
    for a, b in zip(again, first):
        assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())


def test_a_checkpoint_cut_short_falls_back_to_the_one_before(teacher, tmp_path):
    store = DirStore(tmp_path)
    with pytest.raises(Killed):
        _fit(_students(4), teacher, Checkpoints(store, "fit", every_s=0, max_share=float("inf")))
    latest = json.loads((tmp_path / "fit" / "latest.json").read_text())
    assert latest["epoch"] == 3
    newest = tmp_path / "fit" / f"slot-{latest['slot']}.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a kill while writing it
    ckpt = Checkpoints(store, "fit")
    assert ckpt.load()["epoch"] == 2 and ckpt.resumed_from == 2


def test_checkpoints_are_written_only_when_due(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("kdflow.engine.resume.time.monotonic", lambda: clock[0])
    saved = []

    class Memory:
        def read(self, name):
            return None

        def write(self, name, data):
            saved.append(name)
            clock[0] += 0.5  # each write costs half a second

    ckpt = Checkpoints(Memory(), "k", every_s=10.0, max_share=0.02)
    clock[0] += 9.0
    assert not ckpt.due()  # 9 s < every_s
    clock[0] += 1.0
    assert ckpt.due()
    ckpt.save({"epoch": 1})
    assert saved == ["k/slot-0.pt", "k/latest.json"] and ckpt.seconds == 1.0
    clock[0] += 20.0
    assert not ckpt.due()  # the last write cost 1 s: more than 2% of 20 s
    clock[0] += 30.0
    assert ckpt.due()  # 1 s is 2% of 50 s
    ckpt.save({"epoch": 2})
    assert saved[2:] == ["k/slot-1.pt", "k/latest.json"]


def test_global_rng_states_round_trip_weights_only(tmp_path):
    import io
    import random

    import numpy as np

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    snap = global_rng_state(CPU)
    buf = io.BytesIO()
    torch.save(snap, buf)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_global_rng_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), CPU)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
