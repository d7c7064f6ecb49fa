"""Step 1, data prep: the source and target tasks, split by hash, written with their manifest."""

from __future__ import annotations

from kdflow import data, tracking
from kdflow.config import Config
from kdflow.runtime import timing
from kdflow.secrets import scrub
from kdflow.steps.context import StepContext


def prepare_data(cfg: Config, out_dir: str) -> dict:
    """Build source and target tasks, split them deterministically, write tensors and the manifest.

    Talks to no store: the output depends on the config alone, so KFP may serve it from its cache."""
    with timing.compute():
        return data.prepare(cfg.data, cfg.seed, out_dir)


def record_data(ctx: StepContext, data_dir: str) -> None:
    """Log the data a pipeline run trains on as its `data-prep` child run. The first step after data prep
    calls this, so the record is the same whether the data was just built or came from KFP's cache."""
    manifest = data.read_manifest(data_dir)
    with ctx.child("data-prep", "data"):
        tracking.log_params({f"data.{k}": v for k, v in ctx.cfg.data.model_dump().items()})
        tracking.log_metrics(
            {f"{t}_{s}_count": n for t in data.TASKS for s, n in manifest["tasks"][t]["counts"].items()}
        )
        tracking.log_dict(manifest, "manifest.json")
        tracking.log_dict(scrub(ctx.cfg.model_dump(mode="json")), "config.json")  # credentials masked
        tracking.set_tags({"kdflow.data_hash": manifest["content_hash"]})
