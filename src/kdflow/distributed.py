"""Multi-GPU teacher training: torchrun starts one worker per GPU and DistributedDataParallel keeps them in step.

The teacher step's own process trains nothing. When a node offers several GPUs (or
`cluster.teacher_processes` asks for several processes) it runs `python -m torch.distributed.run --standalone`,
which starts `python -m kdflow.distributed teacher ...` once per rank; each worker joins the process group (NCCL
on CUDA, gloo on CPU), takes the GPU of its LOCAL_RANK and runs the same `steps` code, in which `kdflow.train.fit`
wraps the trained model in DDP. Rank 0 alone logs to MLflow and writes the step's files; the launcher reads the
metrics back from them. The helpers below are no-ops (world size 1, rank 0) outside a process group, so the
single-process path is the plain code.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from kdflow.config import Config
    from kdflow.steps import StepContext

WORKER_MODULE = "kdflow.distributed"
CONTEXT_FILE = "context.json"


class WorkerError(RuntimeError):
    """A torchrun worker failed; the message names the exit code and each failed rank's error."""


# ------------------------------------------------------------------------------------------- process group


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, the only process that logs and writes files (always true without a process group)."""
    return rank() == 0


def init_worker(device_name: str) -> torch.device:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
    NCCL and the GPU of LOCAL_RANK on CUDA, gloo on CPU. Returns this worker's device."""
    from kdflow.train import resolve_device

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


def teacher_processes(cfg: Config) -> int:
    """How many processes train the teacher: `cluster.teacher_processes`, else one per visible GPU (1 on CPU)."""
    from kdflow.train import resolve_device

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


# --------------------------------------------------------------------------------------- DDP training helpers


def wrap(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """`module` (already on `device`) in DDP: rank 0's parameters and buffers are broadcast now, gradients are
    averaged across ranks in every backward pass."""
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP syncs them before each training
    forward, so after an epoch's last step they differ per rank; validation and the kept state must not."""
    with torch.no_grad():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite `tensor` in place with rank 0's and return it."""
    dist.broadcast(tensor, src=0)
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (any picklable value) on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-key sums over all ranks; every rank must pass the same keys."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def use_sync_batchnorm(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """Swap every BatchNorm layer of `model` for a SyncBatchNorm sharing its tensors, so batch statistics cover
    the whole global batch as on one GPU (CUDA only: torch's SyncBatchNorm has no CPU kernel). Returns the swaps
    for `restore_batchnorm`."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                sync = nn.SyncBatchNorm.convert_sync_batchnorm(child)
                setattr(parent, name, sync)
                swaps.append((parent, name, child, sync))
    return swaps


def restore_batchnorm(swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]]) -> None:
    """Put the original BatchNorm layers back with the trained values: checkpoints, pruning and the exported
    serving model expect plain BatchNorm."""
    for parent, name, original, sync in reversed(swaps):
        original.load_state_dict(sync.state_dict())
        original.train(sync.training)
        setattr(parent, name, original)


# ------------------------------------------------------------------------------------------------- launching


def launch(nproc: int, args: list[str], error_dir: str | Path, threads: int | None = None) -> None:
    """Run `python -m kdflow.distributed <args>` in `nproc` torchrun workers on this node and wait for them.

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
    from kdflow.cpus import usable_cpus
    from kdflow.train import resolve_device

    return None if resolve_device(cfg.device).type == "cuda" else max(1, usable_cpus() // nproc)


# ------------------------------------------------------------------------------------------ worker entrypoint


def _teacher_worker(args: argparse.Namespace) -> None:
    from kdflow import steps, tracking
    from kdflow.config import config_from_json

    c = json.loads(Path(args.context).read_text())
    ctx = steps.StepContext(
        config_from_json(c["config"]), c["tracking_uri"], c["experiment_id"], c["parent_id"], c["pipeline_run_id"]
    )
    device = init_worker(ctx.cfg.device)
    if is_main():
        tracking.connect(ctx.tracking_uri)
    steps.train_teacher_rank(ctx, args.data_dir, args.out_dir, args.run_id, device)


@record  # torchrun's failure summary then shows the worker's traceback
def main(argv: list[str] | None = None) -> None:
    """Entrypoint of one torchrun worker (started by `launch`, not by hand)."""
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    teacher = sub.add_parser("teacher", help="one rank of the teacher step (steps.train_teacher)")
    teacher.add_argument("--context", required=True, help="JSON file: config, tracking URI and MLflow ids")
    teacher.add_argument("--data-dir", required=True)
    teacher.add_argument("--out-dir", required=True)
    teacher.add_argument("--run-id", required=True, help="the step's MLflow run, which rank 0 logs into")
    teacher.add_argument("--error-dir", required=True, help="where a failing rank writes its error")
    args = parser.parse_args(argv)
    try:
        _teacher_worker(args)
    except BaseException as err:
        rank_ = os.environ.get("RANK", "0")
        (Path(args.error_dir) / f"rank-{rank_}.txt").write_text(f"{type(err).__name__}: {err}")
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
