"""Paired statistics for model-quality claims, against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdflow import stats


def test_mcnemar_exact_against_the_binomial_by_hand():
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 * 0.5**5)  # 0.0625: both tails of 5 coin flips
    assert stats.mcnemar_exact(5, 0) == pytest.approx(0.0625)
    assert stats.mcnemar_exact(3, 3) == 1.0
    # 1 vs 9: P(X <= 1) = (1 + 10) / 1024, doubled
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


def test_paired_gain_one_seed():
    # 100 images: A right on the first 60, B on the first 50 and images 90-94 -> A-only 10 (50-59), B-only 5
    a = np.zeros(100, bool)
    a[:60] = True
    b = np.zeros(100, bool)
    b[:50] = True
    b[90:95] = True
    g = stats.paired_gain(a, b, resamples=2000, seed=0)
    assert g.diff == pytest.approx(0.05)
    assert (g.a_only, g.b_only, g.n, g.seeds) == (10, 5, 100, 1)
    assert g.p_value == pytest.approx(stats.mcnemar_exact(10, 5))
    assert g.ci_low < 0.05 < g.ci_high
    # the interval's width is about 2 * 1.96 * sd(d) / sqrt(n): sd of d is sqrt(0.15 - 0.05^2) ~ 0.384
    assert g.ci_high - g.ci_low == pytest.approx(2 * 1.96 * math.sqrt(0.15 - 0.0025) / 10, rel=0.2)
    assert g.format() == f"+5.0 [{100 * g.ci_low:+.1f}, {100 * g.ci_high:+.1f}]"
    assert not g.significant()  # the interval includes 0


def test_paired_gain_identical_predictions_is_exactly_zero():
    a = np.array([True, False, True, True])
    g = stats.paired_gain(a, a.copy())
    assert (g.diff, g.ci_low, g.ci_high, g.p_value, g.a_only, g.b_only) == (0.0, 0.0, 0.0, 1.0, 0, 0)


def test_paired_gain_clear_win_is_significant():
    rng = np.random.default_rng(1)
    b = rng.random(1000) < 0.7
    a = b | (rng.random(1000) < 0.5)  # A also right on about half the images B misses: never worse
    g = stats.paired_gain(a, b)
    assert g.b_only == 0 and g.a_only == int((a & ~b).sum())
    assert g.ci_low > 0 and g.p_value < 1e-10 and g.significant()


def test_paired_gain_over_seeds_covers_the_seed_spread():
    # three seeds on 200 images: A - B is exactly +10, 0 and -4 points; the pooled mean is +2 points
    n = 200
    a, b = np.zeros((3, n), bool), np.zeros((3, n), bool)
    a[0, :20] = True  # +20 images
    b[2, :8] = True  # -8 images
    g = stats.paired_gain(a, b, resamples=3000, seed=0)
    assert g.diff == pytest.approx((20 - 8) / (3 * n))
    assert (g.a_only, g.b_only, g.seeds, g.n) == (20, 8, 3, 200)
    # the seeds disagree in sign, so an interval that counts seed spread must include 0
    assert g.ci_low < 0 < g.ci_high
    one_seed = stats.paired_gain(a[0], b[0])
    assert one_seed.ci_low > 0  # seed 0 alone looks like a clear win


def test_paired_gain_refuses_unpaired_input():
    with pytest.raises(ValueError, match="equal, non-empty"):
        stats.paired_gain(np.ones(3, bool), np.ones(4, bool))


def test_paired_gain_on_one_image_has_no_spread():
    g = stats.paired_gain(np.array([True]), np.array([False]))
    assert (g.diff, g.ci_low, g.ci_high, g.a_only, g.b_only) == (1.0, 1.0, 1.0, 1, 0)
