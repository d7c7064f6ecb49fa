"""Evaluation metrics against values worked out by hand, and the confusion figure's cells."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdflow import evaluate

# 4 samples, 3 classes; predictions 0, 1, 1, 2 with softmax confidences worked out below
LOGITS = torch.tensor(
    [
        [2.0, 0.0, 0.0],  # pred 0, truth 0: right
        [0.0, 1.0, 0.0],  # pred 1, truth 1: right
        [0.0, 3.0, 1.0],  # pred 1, truth 2: wrong; class 2 is second
        [0.2, 0.0, 0.5],  # pred 2, truth 0: wrong; class 0 is second
    ]
)
Y = torch.tensor([0, 1, 2, 0])


def _conf(row: list[float]) -> float:
    e = [math.exp(v) for v in row]
    return max(e) / sum(e)


def test_topk_accuracy():
    assert evaluate.topk_accuracy(LOGITS, Y, 1) == 0.5
    assert evaluate.topk_accuracy(LOGITS, Y, 2) == 1.0
    assert evaluate.topk_accuracy(LOGITS, Y, 5) == 1.0  # k above the class count means every class


def test_confusion_matrix_rows_are_truth_and_per_class_accuracy():
    cm = evaluate.confusion_matrix(LOGITS.argmax(1), Y, 4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = expected[1, 1] = expected[2, 1] = expected[0, 2] = 1
    np.testing.assert_array_equal(cm, expected)
    acc = evaluate.per_class_accuracy(cm)
    assert acc[:3] == [0.5, 1.0, 0.0]
    assert math.isnan(acc[3])  # no test sample of class 3: undefined, not 0


def test_expected_calibration_error_by_hand():
    conf = [_conf(r) for r in LOGITS.tolist()]  # 0.7870, 0.5761, 0.8438, 0.4260
    # 2 bins: (0, .5] holds sample 3 (wrong), (.5, 1] holds samples 0, 1 (right) and 2 (wrong)
    low = 1 / 4 * abs(0.0 - conf[3])
    high = 3 / 4 * abs(2 / 3 - (conf[0] + conf[1] + conf[2]) / 3)
    assert evaluate.expected_calibration_error(LOGITS, Y, bins=2) == pytest.approx(low + high, abs=1e-6)
    # one bin: |accuracy - mean confidence| over everything
    assert evaluate.expected_calibration_error(LOGITS, Y, bins=1) == pytest.approx(abs(0.5 - sum(conf) / 4), abs=1e-6)


def test_agreement():
    teacher = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0]])
    assert evaluate.agreement(LOGITS, teacher) == 0.75  # sample 2: student says 1, teacher 2


def test_classification_report_keys_and_values():
    m, cm = evaluate.classification_report(LOGITS, Y, 3, ece_bins=1, prefix="val")
    assert set(m) == {"val_top1", "val_loss", "val_ece", "val_class_0_acc", "val_class_1_acc", "val_class_2_acc"}
    assert m["val_top1"] == 0.5 and m["val_class_2_acc"] == 0.0
    assert m["val_loss"] == pytest.approx(float(nn.functional.cross_entropy(LOGITS, Y)))
    assert cm.sum() == 4
    ten, _ = evaluate.classification_report(torch.randn(8, 10), torch.arange(8), 10)
    assert "test_top5" in ten  # top-5 only with more than 5 classes
    # classes 8 and 9 have no sample: no accuracy entry rather than NaN (KFP's Metrics artifact refuses NaN)
    assert [k for k in ten if "_class_" in k] == [f"test_class_{i}_acc" for i in range(8)]
    assert all(math.isfinite(v) for v in ten.values())


def test_flops_count_multiply_adds_twice():
    # conv 1->4, 3x3, padding 1 on 8x8: 64 positions x 4 out x 9 MACs; linear 256 -> 10
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(256, 10, bias=False))
    assert evaluate.flops(model, torch.randn(5, 1, 8, 8)) == 2 * (64 * 4 * 9 + 256 * 10)


def test_cpu_latency_is_the_median_after_warm_up_at_the_given_threads(monkeypatch):
    # the warm-up run reads no clock, then timed runs of 1, 3 and 2 ms
    clock = iter([1.0, 1.001, 2.0, 2.003, 3.0, 3.002])
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: next(clock))
    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append((x.shape[0], torch.get_num_threads()))
            return super().forward(x)

    before = torch.get_num_threads()
    ms = evaluate.cpu_latency_ms(Probe(4, 2), torch.randn(3, 4), batch_size=2, warmup=1, repeats=3, threads=1)
    assert ms == pytest.approx(2.0)
    assert seen == [(2, 1)] * 4  # batch 2 built from the example, one intra-op thread while timing
    assert torch.get_num_threads() == before  # put back afterwards


def test_confusion_figure_writes_counts_in_non_empty_cells_only():
    import matplotlib.pyplot as plt

    cm = np.array([[5, 0, 1], [0, 4, 0], [2, 0, 3]])
    fig = evaluate.confusion_figure(cm, ["a", "b", "c"], "demo")
    try:
        (ax,) = fig.axes
        cells = {(tuple(map(int, t.get_position())), t.get_text(), t.get_color()) for t in ax.texts}
        assert cells == {
            ((0, 0), "5", "white"),  # above half the largest count (2.5): white on dark blue
            ((2, 0), "1", "black"),  # x = predicted column, y = true row
            ((1, 1), "4", "white"),
            ((0, 2), "2", "black"),
            ((2, 2), "3", "white"),
        }
        assert ax.get_title() == "demo" and [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    finally:
        plt.close(fig)
