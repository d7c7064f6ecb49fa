"""Learning-rate schedules, warm-up and early stopping in every training phase (`TrainConfig`)."""

from __future__ import annotations

import math

import pytest
import torch

from kdflow.config import ConfigError, LossConfig, TrainConfig, load_config
from kdflow.engine.loop import FitResult, Student, fit_many, make_schedule
from tests.helpers.paths import REPO
from tests.helpers.quadrants import CPU, NORM, TRAIN, VAL, cfg, cnn, train_quadrants


def _lrs(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate of each optimizer step of a run, as the loop steps the schedule."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    sched = make_schedule(config, opt, steps_per_epoch)
    out = []
    for _ in range(config.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_without_warmup_is_the_old_schedule_exactly():
    c = TrainConfig(epochs=3, lr=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _lrs(c, 4) == expected


def test_linear_warmup_then_cosine_constant_and_step():
    warm = _lrs(TrainConfig(epochs=4, lr=0.1, warmup_epochs=1), 5)  # 5 warm-up steps of 20
    # torch's LinearLR: the factor climbs from 1/5 by equal steps and reaches 1 when the warm-up ends
    assert warm[:5] == pytest.approx([0.02, 0.036, 0.052, 0.068, 0.084])
    # then cosine over the 15 remaining steps: step k after the warm-up has 0.1 * (1 + cos(pi * k / 15)) / 2
    assert warm[5:] == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 15)) for k in range(15)])
    assert _lrs(TrainConfig(epochs=2, lr=0.1, schedule="constant"), 3) == pytest.approx([0.1] * 6)
    step = _lrs(TrainConfig(epochs=4, lr=0.1, schedule="step"), 2)  # 8 steps: x0.1 at step 4 and step 6
    assert step == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_warmup_must_be_shorter_than_the_run():
    with pytest.raises(ConfigError, match="warmup_epochs=5 must be below epochs=5"):
        load_config(None, {"distill.train": {"epochs": 5, "warmup_epochs": 5}})


def test_early_stopping_ends_after_patience_epochs_without_improvement():
    full = train_quadrants(cnn(8), cfg(epochs=12, lr=0.05))
    stopped = train_quadrants(cnn(8), cfg(epochs=12, lr=0.05, patience=2))
    # the same run up to the stop: the history is a prefix of the full run's, and it ends `patience` epochs after
    # the best epoch so far; or it never stops, when validation keeps improving to the end
    assert stopped.history == full.history[: len(stopped.history)]
    keys = [(h["val_acc"], -h["val_loss"]) for h in full.history]
    best, since = (-1.0, -math.inf), 0
    for epoch, key in enumerate(keys, 1):
        best, since = (key, 0) if key > best else (best, since + 1)
        if since >= 2:
            assert (stopped.epochs, stopped.stopped_early) == (epoch, True)
            break
    else:
        assert (stopped.epochs, stopped.stopped_early) == (12, False)
    assert stopped.best_epoch == max(range(1, stopped.epochs + 1), key=lambda e: (keys[e - 1], -e))


def test_a_student_that_stops_early_leaves_the_others_as_if_trained_alone():
    kd = LossConfig(name="kd", kind="kd")
    alone_model = cnn(4, seed=1)
    teacher = cnn(16, seed=3)
    (alone,) = fit_many(
        [Student(alone_model, kd)], TRAIN, VAL, cfg(epochs=8), NORM, seed=0, device=CPU, teacher=teacher
    )
    quitter, other = cnn(8, seed=2), cnn(4, seed=1)
    results = fit_many(
        [Student(quitter, LossConfig(name="ce", kind="ce")), Student(other, kd)],
        TRAIN,
        VAL,
        cfg(epochs=8, patience=1),
        NORM,
        seed=0,
        device=CPU,
        teacher=teacher,
    )
    assert results[0].stopped_early and results[0].epochs < 8
    # patience is per student: the kd student also had patience 1, so compare it with a lone run that has it too
    (alone_p,) = fit_many(
        [Student(cnn(4, seed=1), kd)], TRAIN, VAL, cfg(epochs=8, patience=1), NORM, seed=0, device=CPU, teacher=teacher
    )
    assert results[1].history == alone_p.history
    assert alone.history[: len(alone_p.history)] == alone_p.history


def test_still_improving_means_the_best_epoch_is_near_the_end():
    assert FitResult(best_epoch=10, best_val_acc=0.9, epochs=10).still_improving
    assert FitResult(best_epoch=9, best_val_acc=0.9, epochs=10).still_improving  # within the last 10 // 5 = 2
    assert not FitResult(best_epoch=8, best_val_acc=0.9, epochs=10).still_improving
    assert not FitResult(best_epoch=10, best_val_acc=0.9, epochs=10, stopped_early=True).still_improving
    assert not FitResult(best_epoch=0, best_val_acc=0.0, epochs=0).still_improving


def test_teacher_phases_default_to_warmup_and_early_stopping():
    from kdflow.config import Config

    t = Config().teacher  # the schema's defaults
    assert (t.pretrain.warmup_epochs, t.pretrain.patience, t.finetune.warmup_epochs, t.finetune.patience) == (
        1,
        5,
        1,
        5,
    )
    run = load_config(None, {}).teacher  # the built-in run fine-tunes on 10 images per class: more patience
    assert run.pretrain == t.pretrain and (run.finetune.warmup_epochs, run.finetune.patience) == (1, 15)
    assert load_config(REPO / "configs" / "default.yaml").teacher == run
