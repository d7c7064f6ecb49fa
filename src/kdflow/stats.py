"""Is one classifier better than another on the same test images? Paired statistics for model-quality claims.

Two models scored on the same images are paired: per image, each is right or wrong. The difference in top-1
accuracy is the mean of the per-image differences d_i = right_A(i) − right_B(i) ∈ {−1, 0, 1}, so

- its 95% interval comes from a paired bootstrap over images (`scipy.stats.bootstrap` on d, BCa), and
- the exact McNemar test asks whether the images only A gets right (b) and those only B gets right (c) could be
  a fair coin's split: a two-sided binomial test of b against b + c at p = ½ (`scipy.stats.binomtest`).

With several training seeds the difference varies between seeds as well as between test samples; `paired_gain`
then bootstraps over seeds and images together (a seed drawn, then its images), so the interval covers both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Gain:
    """A − B on the same images: the top-1 difference (a fraction), its 95% interval, the McNemar p-value, and
    the discordant counts (images only A gets right, only B gets right; summed over seeds)."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    a_only: int
    b_only: int
    n: int  # test images (per seed)
    seeds: int = 1

    def as_dict(self) -> dict:
        return asdict(self)

    def significant(self, level: float = 0.05) -> bool:
        """A beats B: the interval excludes 0 from below and McNemar rejects a fair split at `level`."""
        return self.ci_low > 0 and self.p_value < level

    def format(self) -> str:
        """`+1.2 [+0.3, +2.1]` in accuracy points."""
        return f"{100 * self.diff:+.1f} [{100 * self.ci_low:+.1f}, {100 * self.ci_high:+.1f}]"


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    return float(sps.binomtest(a_only, n, 0.5, alternative="two-sided").pvalue)


def paired_gain(
    right_a: np.ndarray, right_b: np.ndarray, resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> Gain:
    """A − B from boolean correctness arrays of shape (N,) or (S, N): S seeds of each model on the same N images.

    One seed: a BCa paired bootstrap over images. Several: a two-level bootstrap (seeds, then images within the
    drawn seeds), percentile interval, so the interval reflects how much the difference moves between seeds
    too. McNemar's test uses the discordant counts summed over seeds."""
    a = np.atleast_2d(np.asarray(right_a, dtype=bool))
    b = np.atleast_2d(np.asarray(right_b, dtype=bool))
    if a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(f"paired_gain needs two equal, non-empty correctness arrays, got {a.shape} and {b.shape}")
    d = a.astype(np.int8) - b.astype(np.int8)  # (S, N) in {-1, 0, 1}
    diff = float(d.mean())
    a_only, b_only = int((d == 1).sum()), int((d == -1).sum())
    rng = np.random.default_rng(seed)
    if not d.any() or d.size == 1:
        low = high = diff  # identical predictions, or one image: every resample gives the same difference
    elif len(d) == 1:
        res = sps.bootstrap(
            (d[0],), np.mean, n_resamples=resamples, confidence_level=confidence, method="BCa", random_state=rng
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (np.isfinite(low) and np.isfinite(high)):  # BCa degenerates on near-constant samples
            res = sps.bootstrap(
                (d[0],),
                np.mean,
                n_resamples=resamples,
                confidence_level=confidence,
                method="percentile",
                random_state=rng,
            )
            low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    else:
        s, n = d.shape
        means = np.empty(resamples)
        for r in range(resamples):
            rows = rng.integers(0, s, s)  # seeds drawn with replacement
            cols = rng.integers(0, n, (s, n))  # then images within each drawn seed
            means[r] = d[rows[:, None], cols].mean()
        tail = (1 - confidence) / 2
        low, high = (float(q) for q in np.quantile(means, [tail, 1 - tail]))
    return Gain(diff, low, high, mcnemar_exact(a_only, b_only), a_only, b_only, d.shape[1], len(d))
