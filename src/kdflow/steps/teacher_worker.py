"""One torchrun worker of the teacher step (started by `kdflow.steps.teacher_ddp.launch`, not by hand)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from kdflow import tracking
from kdflow.config import config_from_json
from kdflow.engine import ddp
from kdflow.steps.context import StepContext
from kdflow.steps.teacher import train_teacher_rank
from kdflow.steps.teacher_ddp import WORKER_MODULE, init_worker


def _teacher_worker(args: argparse.Namespace) -> None:
    c = json.loads(Path(args.context).read_text())
    ctx = StepContext(
        config_from_json(c["config"]), c["tracking_uri"], c["experiment_id"], c["parent_id"], c["pipeline_run_id"]
    )
    device = init_worker(ctx.cfg.device)
    if ddp.is_main():
        tracking.connect(ctx.tracking_uri)
    train_teacher_rank(ctx, args.data_dir, args.out_dir, args.run_id, device)


@record  # torchrun's failure summary then shows the worker's traceback
def main(argv: list[str] | None = None) -> None:
    """Entrypoint of one torchrun worker (started by `launch`, not by hand)."""
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    teacher = sub.add_parser("teacher", help="one rank of the teacher step (kdflow.steps.teacher.train_teacher)")
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
