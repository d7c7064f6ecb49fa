"""The evidence a run puts in front of its user: is each distilled candidate better than the same student trained
without the teacher, and is the teacher worth distilling from at all?

Every distilled candidate is compared with the `ce` candidate of the same student in the same run, on the same
test images (`kdflow.stats.paired_gain`): the top-1 difference, its paired bootstrap 95% interval and the exact
McNemar p-value. A teacher whose validation accuracy is below the best `ce` candidate's is *weak*: a student
trained without it already does better, and the candidates distilled from it are flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kdflow.stats import Gain, paired_gain

STUDENT_TAG = "kdflow.student"
LOSS_TAG = "kdflow.loss"
INIT_TAG = "kdflow.init"
SEARCH_TAG = "kdflow.search"  # set on a search candidate (`distill.search`): never a baseline, even if it chose ce
BASELINE_KIND = "ce"
GAIN_PREFIX = "gain_vs_ce_"
SCRATCH_PREFIX = "gain_vs_scratch_"
SCRATCH_SUFFIX = "_scratch"  # the from-scratch twin of a pruned student (`distill.scratch_baselines`)


@dataclass
class Scored:
    """One candidate as the evidence sees it: its student, objective kind, metrics and per-image correctness."""

    name: str
    student: str
    kind: str
    metrics: dict[str, float]
    correct: np.ndarray  # (N,) bool: right on each test image, in the test split's order
    init: str = "pruned"  # where the student's weights started: pruned | scratch | random
    searched: bool = False  # a search candidate: its kind is what the search chose

    @property
    def baseline(self) -> bool:
        """The student's plain-CE candidate of the grid (a search that chose CE is compared with it, not one)."""
        return self.kind == BASELINE_KIND and not self.searched


@dataclass
class Evidence:
    baseline: dict[str, str] = field(default_factory=dict)  # distilled candidate -> its student's ce candidate
    gains: dict[str, Gain] = field(default_factory=dict)  # distilled candidate -> gain over its ce baseline
    scratch: dict[str, str] = field(default_factory=dict)  # pruned student's candidate -> its scratch twin's ce
    scratch_gains: dict[str, Gain] = field(default_factory=dict)  # ... and its gain over that from-scratch ce
    weak_teacher: bool = False
    weak_teacher_reason: str = ""

    def metrics(self, name: str) -> dict[str, float]:
        """The MLflow metrics of `name`'s gain (empty for a baseline or a candidate without one)."""
        out = {}
        for prefix, g in ((GAIN_PREFIX, self.gains.get(name)), (SCRATCH_PREFIX, self.scratch_gains.get(name))):
            if g is not None:
                out.update(
                    {
                        f"{prefix}test_top1": g.diff,
                        f"{prefix}ci_low": g.ci_low,
                        f"{prefix}ci_high": g.ci_high,
                        f"{prefix}p_value": g.p_value,
                    }
                )
        return out

    def summary(self) -> dict:
        """What decision.json records."""
        return {
            "gains_vs_ce": {
                n: {"baseline": self.baseline[n], **g.as_dict(), "shown": g.format()} for n, g in self.gains.items()
            },
            "gains_vs_scratch": {
                n: {"baseline": self.scratch[n], **g.as_dict(), "shown": g.format()}
                for n, g in self.scratch_gains.items()
            },
            "weak_teacher": self.weak_teacher,
            "weak_teacher_reason": self.weak_teacher_reason,
        }


def gather(candidates: list[Scored], teacher_val_top1: float) -> Evidence:
    """Pair every distilled candidate with its student's `ce` candidate (and a pruned student's candidates with
    its from-scratch twin's `ce`, when the run has one) and judge the teacher."""
    ev = Evidence()
    baselines = {c.student: c for c in candidates if c.baseline}
    for c in candidates:
        base = baselines.get(c.student)
        if c.baseline or base is None:
            continue
        ev.baseline[c.name] = base.name
        ev.gains[c.name] = paired_gain(c.correct, base.correct)
    scratch = {c.student.removesuffix(SCRATCH_SUFFIX): c for c in candidates if c.init == "scratch"}
    for c in candidates:  # the pruned student's candidates (its ce included) against its architecture from scratch
        twin = scratch.get(c.student)
        if c.init == "pruned" and twin is not None and twin.baseline:
            ev.scratch[c.name] = twin.name
            ev.scratch_gains[c.name] = paired_gain(c.correct, twin.correct)
    if baselines:
        best = max(baselines.values(), key=lambda c: (c.metrics["val_top1"], c.name))
        if teacher_val_top1 < best.metrics["val_top1"]:
            ev.weak_teacher = True
            ev.weak_teacher_reason = (
                f"weak teacher: its val top-1 {teacher_val_top1:.2%} is below the {best.metrics['val_top1']:.2%} "
                f"of {best.name}, a student trained without it; distilling from it is unlikely to help "
                "(train the teacher longer or give it more capacity)"
            )
    return ev
