"""Config overrides the step and pipeline tests share."""

from __future__ import annotations


def tiny_overrides(**extra) -> dict:
    """The built-in default shrunk to seconds: few epochs, one pruned student, two losses, and the whole target
    split (not the default's 10 per class), so the steps' tests see a few hundred target images."""
    return {
        "data.source_fraction": 0.4,
        "data.target_samples_per_class": None,
        "teacher.pretrain": {"epochs": 3},
        "teacher.finetune": {"epochs": 3},
        "prune.ratios": [0.6],
        "distill.students": [{"name": "pruned60", "from_pruned": 0.6}],
        "distill.losses": [{"name": "kd", "kind": "kd"}, {"name": "ce", "kind": "ce"}],
        "distill.train": {"epochs": 2, "epoch_over": "target"},
        "evaluate.latency_repeats": 3,
        "registry.settle_seconds": 0.0,  # one writer at a time: a read after the write is enough
        "export.onnx": False,  # seconds a model; the export's own tests (tests/test_steps.py) turn it on
        **extra,
    }
