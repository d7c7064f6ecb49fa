"""Several students over one data stream (`fit_many`) and the teacher's outputs computed once: the results must
be exactly those of training each student alone, and the teacher must not run per batch when it need not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdflow import steps
from kdflow.config import LossConfig
from kdflow.train import Student, TeacherOutputs, compute_teacher_outputs, fit, fit_many, teacher_outputs_key
from tests.test_models_train import (  # noqa: F401  (one_thread: the module's autouse fixture)
    CPU,
    NORM,
    SOURCE,
    TRAIN,
    VAL,
    cfg,
    cnn,
    one_thread,
    state,
    train_quadrants,
)

KD = LossConfig(name="kd", kind="kd", temperature=4.0, alpha=0.9)
MSE = LossConfig(name="mse", kind="logit_mse", lam=0.1)
CE = LossConfig(name="ce", kind="ce")
HINT = LossConfig(name="hint", kind="hint", beta=1.0)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    t = cnn(8)
    train_quadrants(t, cfg(4))
    return t


class Dropped(nn.Module):
    """A student whose training draws from the global RNG (dropout), to prove each keeps its own stream."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = cnn(4, seed=3)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.body(x))


def _grid(teacher, losses, augment="none"):
    """Each loss's student trained alone, then all together: (alone results, together results, models)."""
    config = cfg(3, augment=augment)
    alone, alone_models = [], []
    for loss in losses:
        m = Dropped() if loss is CE else cnn(4, seed=1)
        hint = ("features", "features") if loss.kind == "hint" else None
        alone.append(train_quadrants(m, config, loss=loss, teacher=teacher, source=SOURCE, hint_layers=hint))
        alone_models.append(m)
    together_models = [Dropped() if loss is CE else cnn(4, seed=1) for loss in losses]
    students = [
        Student(m, loss, ("features", "features") if loss.kind == "hint" else None)
        for m, loss in zip(together_models, losses)
    ]
    together = fit_many(students, TRAIN, VAL, config, NORM, seed=0, device=CPU, teacher=teacher, source=SOURCE)
    return alone, together, alone_models, together_models


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_students_together_equal_students_alone(teacher, augment):
    alone, together, a_models, t_models = _grid(teacher, [KD, MSE, CE, HINT], augment)
    for loss, a, t, am, tm in zip([KD, MSE, CE, HINT], alone, together, a_models, t_models):
        assert t.history == a.history, loss.name
        assert t.best_epoch == a.best_epoch, loss.name
        for k, v in state(am).items():
            assert torch.equal(v, tm.state_dict()[k]), (loss.name, k)


def test_source_transfer_students_together_equal_alone(teacher):
    both = LossConfig(name="both", kind="kd", transfer="both")
    src = LossConfig(name="src", kind="logit_mse", transfer="source")
    alone, together, a_models, t_models = _grid(teacher, [both, src])
    assert [r.history for r in together] == [r.history for r in alone]
    for am, tm in zip(a_models, t_models):
        assert all(torch.equal(v, tm.state_dict()[k]) for k, v in am.state_dict().items())


def test_one_stream_per_call(teacher):
    both = LossConfig(name="both", kind="kd", transfer="both")
    students = [Student(cnn(4), KD), Student(cnn(4), both)]
    with pytest.raises(ValueError, match="must agree on using source data"):
        fit_many(students, TRAIN, VAL, cfg(1), NORM, seed=0, device=CPU, teacher=teacher, source=SOURCE)


class Counting(nn.Module):
    """Wraps the teacher and counts the images it is run on."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.images = net, 0

    def forward(self, x):
        self.images += len(x)
        return self.net(x)


@pytest.mark.parametrize(("augment", "expected"), [("none", len(TRAIN)), ("crop", 3 * len(TRAIN))])
def test_teacher_runs_once_per_image_without_augmentation(teacher, augment, expected):
    """No augmentation: one pass over the train split for 3 epochs and 3 students. With random crops the
    teacher must see every new batch: once per image per epoch (shared by the students, not 3× that)."""
    counting = Counting(teacher)
    students = [Student(cnn(4), KD), Student(cnn(4), MSE), Student(cnn(4), CE)]
    fit_many(students, TRAIN, VAL, cfg(3, augment=augment), NORM, seed=0, device=CPU, teacher=counting)
    assert counting.images == expected


def test_precomputed_teacher_outputs_are_used_and_equal_on_the_fly(teacher):
    outputs = compute_teacher_outputs(teacher, NORM, "k", TRAIN.x)
    with torch.no_grad():
        direct = teacher.eval()(NORM(TRAIN.x))
    assert outputs.target.shape == (len(TRAIN), 4)
    torch.testing.assert_close(outputs.target, direct, rtol=1e-5, atol=1e-5)
    counting = Counting(teacher)
    a, b = cnn(4, seed=1), cnn(4, seed=1)
    fit(a, TRAIN, VAL, cfg(2), NORM, seed=0, device=CPU, loss=KD, teacher=counting, teacher_outputs=outputs)
    assert counting.images == 0  # every lookup served from the precomputed outputs
    fit(b, TRAIN, VAL, cfg(2), NORM, seed=0, device=CPU, loss=KD, teacher=teacher)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-5)


def test_teacher_outputs_key_follows_weights_and_data(teacher, tmp_path):
    key = teacher_outputs_key(teacher, "data-1")
    assert key == teacher_outputs_key(teacher, "data-1")
    assert key != teacher_outputs_key(teacher, "data-2")
    other = cnn(8, seed=5)
    assert key != teacher_outputs_key(other, "data-1")
    torch.save({"key": key, "target": torch.zeros(len(TRAIN), 4)}, tmp_path / steps.TEACHER_OUTPUTS_FILE)
    manifest = {"content_hash": "data-1"}
    loaded = steps.load_teacher_outputs(teacher, manifest, str(tmp_path))
    assert isinstance(loaded, TeacherOutputs) and loaded.key == key
    assert steps.load_teacher_outputs(other, manifest, str(tmp_path)) is None  # stale: another teacher
    assert steps.load_teacher_outputs(teacher, {"content_hash": "data-2"}, str(tmp_path)) is None


def test_one_teacher_pass_gives_logits_and_hint_features(teacher):
    """Without augmentation a hint student's teacher features come from the same single pass as the logits:
    the train split once, plus one image to size the feature cache and two to size the hint adapter."""
    counting = Counting(teacher)
    students = [Student(cnn(4), KD), Student(cnn(4), HINT, ("features", "net.features"))]
    fit_many(students, TRAIN, VAL, cfg(2), NORM, seed=0, device=CPU, teacher=counting)
    assert counting.images == len(TRAIN) + 1 + 2
