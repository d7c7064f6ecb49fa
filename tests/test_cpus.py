"""CPUs a process may use: the affinity mask capped by a container's cgroup CPU quota."""

from __future__ import annotations

import os

import pytest
import torch

from kdflow.runtime import cpus


def _v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path / "cpu.max"


def _v1(tmp_path, quota, period):
    (tmp_path / "q").write_text(quota)
    (tmp_path / "p").write_text(period)
    return (tmp_path / "q", tmp_path / "p")


@pytest.mark.parametrize(
    ("text", "expected"), [("200000 100000\n", 2.0), ("150000 100000\n", 1.5), ("max 100000\n", None)]
)
def test_quota_from_cgroup_v2(tmp_path, text, expected):
    assert cpus.quota_cpus(_v2(tmp_path, text), (tmp_path / "none", tmp_path / "none")) == expected


@pytest.mark.parametrize(("quota", "expected"), [("50000\n", 0.5), ("-1\n", None)])
def test_quota_from_cgroup_v1_when_there_is_no_v2(tmp_path, quota, expected):
    assert cpus.quota_cpus(tmp_path / "no-cpu.max", _v1(tmp_path, quota, "100000\n")) == expected


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cpus.quota_cpus(tmp_path / "a", (tmp_path / "b", tmp_path / "c")) is None


@pytest.mark.parametrize(("quota", "affinity", "expected"), [(1.5, 64, 2), (0.2, 64, 1), (8.0, 4, 4), (None, 3, 3)])
def test_usable_cpus_caps_the_affinity_mask_by_the_quota(monkeypatch, quota, affinity, expected):
    monkeypatch.setattr(cpus, "quota_cpus", lambda: quota)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    assert cpus.usable_cpus() == expected


def test_torch_threads_lowered_to_the_quota_never_raised(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(cpus, "usable_cpus", lambda: 2)
        assert cpus.fit_threads_to_cpus() == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(cpus, "usable_cpus", lambda: 8)
        assert cpus.fit_threads_to_cpus() == 2  # a step that chose fewer threads keeps them
    finally:
        torch.set_num_threads(before)
