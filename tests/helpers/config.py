"""Config overrides the step and pipeline tests share."""

from __future__ import annotations


def tiny_overrides(**extra) -> dict:
    """The default config shrunk to seconds: few epochs, one student, two losses."""
    return {
        "teacher.pretrain": {"epochs": 3},
        "teacher.finetune": {"epochs": 3},
        "prune.ratios": [0.6],
        "distill.students": [{"name": "pruned60", "from_pruned": 0.6}],
        "distill.losses": [{"name": "kd", "kind": "kd"}, {"name": "ce", "kind": "ce"}],
        "distill.train": {"epochs": 2},
        "evaluate.latency_repeats": 3,
        **extra,
    }
