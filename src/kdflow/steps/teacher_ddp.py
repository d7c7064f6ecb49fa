"""Multi-GPU teacher training: torchrun starts one worker per GPU and DistributedDataParallel keeps them in step.

The teacher step's own process trains nothing. When a node offers several GPUs (or
`cluster.teacher_processes` asks for several processes) it runs `python -m torch.distributed.run --standalone`,
which starts `python -m kdflow.steps.teacher_worker teacher ...` once per rank; each worker joins the process
group (NCCL on CUDA, gloo on CPU), takes the GPU of its LOCAL_RANK and runs the same step code, in which
`kdflow.engine.loop.fit_many` wraps the trained model in DDP. Rank 0 alone logs to MLflow and writes the step's
files; the launcher reads the metrics back from them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kdflow.engine.device import resolve_device
from kdflow.runtime.cpus import usable_cpus

if TYPE_CHECKING:
    from kdflow.config import Config
    from kdflow.steps.context import StepContext

WORKER_MODULE = "kdflow.steps.teacher_worker"
CONTEXT_FILE = "context.json"


class WorkerError(RuntimeError):
    """A torchrun worker failed; the message names the exit code and each failed rank's error."""


def teacher_processes(cfg: Config) -> int:
    """How many processes train the teacher: `cluster.teacher_processes`, else one per visible GPU (1 on CPU)."""
    n = cfg.cluster.teacher_processes
    if resolve_device(cfg.device).type != "cuda":
        return n or 1
    gpus = torch.cuda.device_count()
    if n is None:
        return max(1, gpus)
    if n > gpus:
        raise ValueError(
            f"cluster.teacher_processes={n} but only {gpus} GPU(s) are visible: DDP runs one process per GPU; "
            "set it to at most the GPU count, or null for one process per GPU"
        )
    return n


def init_worker(device_name: str) -> torch.device:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
    NCCL and the GPU of LOCAL_RANK on CUDA, gloo on CPU. Returns this worker's device."""
    local = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return device


def launch(nproc: int, args: list[str], error_dir: str | Path, threads: int | None = None) -> None:
    """Run `python -m kdflow.steps.teacher_worker <args>` in `nproc` torchrun workers on this node and wait for them.

    `--standalone` rendezvous picks a free local port. `threads` sets OMP_NUM_THREADS per worker unless the
    environment does (torchrun's default is 1). Workers write their exception to `error_dir/rank-N.txt`; on
    failure the raised WorkerError carries those and torchrun's exit code (the tracebacks went to stderr)."""
    env = dict(os.environ)
    if threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    if "GLOO_SOCKET_IFNAME" not in env and "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # one node: gloo's sockets (CPU workers) stay on loopback
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run([*cmd, "-m", WORKER_MODULE, *args], env=env, check=False)
    if proc.returncode != 0:
        errors = [f"rank {p.stem[5:]}: {p.read_text().strip()}" for p in sorted(Path(error_dir).glob("rank-*.txt"))]
        raise WorkerError(
            f"{nproc} torchrun workers running {' '.join(args[:1])} failed (torchrun exit code {proc.returncode})"
            + (": " + "; ".join(errors) if errors else "; see the workers' output above")
        )


def launch_teacher(ctx: StepContext, data_dir: str, out_dir: str, run_id: str, nproc: int) -> None:
    """Train the teacher in `nproc` DDP workers; rank 0 logs into the existing MLflow run `run_id` and writes
    the checkpoint and info file to `out_dir`."""
    with tempfile.TemporaryDirectory(prefix="kdflow-ddp-") as tmp:
        context = {
            "config": ctx.cfg.to_json(),
            "tracking_uri": ctx.tracking_uri,
            "experiment_id": ctx.experiment_id,
            "parent_id": ctx.parent_id,
            "pipeline_run_id": ctx.pipeline_run_id,
        }
        (Path(tmp) / CONTEXT_FILE).write_text(json.dumps(context))
        args = ["teacher", "--context", str(Path(tmp) / CONTEXT_FILE), "--data-dir", data_dir, "--out-dir", out_dir]
        launch(nproc, [*args, "--run-id", run_id, "--error-dir", tmp], tmp, threads=_cpu_threads(ctx.cfg, nproc))


def _cpu_threads(cfg: Config, nproc: int) -> int | None:
    """CPU workers share this process's cores; GPU workers keep torchrun's one thread each."""
    return None if resolve_device(cfg.device).type == "cuda" else max(1, usable_cpus() // nproc)
