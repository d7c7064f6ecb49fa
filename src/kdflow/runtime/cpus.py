"""How many CPUs this process may really use: its affinity mask, capped by a container's CPU quota.

A pod limited to 2 CPUs on a 64-core node still sees all 64 cores in its affinity mask, and torch starts one
intra-op thread per core; the kernel then throttles the pod every scheduling period, and the step runs slower
than with 2 threads. The quota is in the cgroup's `cpu.max` (v2) or `cpu.cfs_quota_us`/`cpu.cfs_period_us` (v1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def quota_cpus(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> float | None:
    """CPUs allowed by the cgroup quota (e.g. 1.5), or None when there is no quota (or no cgroup to read)."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int(p.read_text()) for p in v1)
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs in the affinity mask, capped by the quota rounded up (1.5 CPUs → 2 threads, as the JVM counts)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = quota_cpus()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def fit_threads_to_cpus() -> int:
    """Lower torch's intra-op threads to the usable CPUs when it would start more; returns the thread count."""
    import torch

    usable = usable_cpus()
    if torch.get_num_threads() > usable:
        torch.set_num_threads(usable)
    return torch.get_num_threads()


PARALLEL_THREADS_ENV = "KDFLOW_PARALLEL_THREADS"  # set by the local runner: CPU threads per ParallelFor step


def share_cores() -> int:
    """Steps inside the ParallelFor run side by side locally: each takes its share of the cores (the local
    runner sets PARALLEL_THREADS_ENV), or it would claim every one. Elsewhere (a pod) torch's threads are capped
    at the CPUs the container's quota allows. Returns the thread count."""
    import torch

    threads = os.environ.get(PARALLEL_THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
        return torch.get_num_threads()
    return fit_threads_to_cpus()
