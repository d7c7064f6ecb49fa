"""Shared fixtures: the shared real-data folder beside the repository, and a tiny version of the default config."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdflow.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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


@pytest.fixture
def tiny_config() -> Config:
    return load_config(None, tiny_overrides())
