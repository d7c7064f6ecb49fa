"""Fixtures shared by several test modules. Shared helpers (no fixtures) live in `tests/helpers/`."""

from __future__ import annotations

import pytest

from kdflow.config import Config, load_config
from tests.helpers.config import tiny_overrides
from tests.helpers.paths import REPO, SHARED_DATA  # noqa: F401  (re-exported for modules that import them from here)


@pytest.fixture
def tiny_config() -> Config:
    return load_config(None, tiny_overrides())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast, and far faster when other work shares the CPUs. A module
    turns it on with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(one_thread):
    """A width-8 CNN trained to solve the quadrant task (`tests.helpers.quadrants`), one per module."""
    from tests.helpers.quadrants import cfg, cnn, train_quadrants

    t = cnn(8)
    res = train_quadrants(t, cfg(6))
    assert res.best_val_acc == 1.0
    return t
