"""Step 3, pruning: one structurally pruned copy of the fine-tuned teacher per configured ratio."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from kdflow import data, tracking
from kdflow.evaluate import accuracy, predict
from kdflow.models import checkpoint, pruning
from kdflow.runtime import cpus, timing
from kdflow.steps.context import StepContext, pruned_dir


def prune_teacher(ctx: StepContext, data_dir: str, teacher_dir: str, out_dir: str) -> list[dict]:
    """One structurally pruned copy of the fine-tuned teacher per configured ratio (not fine-tuned yet:
    distillation trains them), each in `pruned_dir(out_dir, ratio)`; a report per ratio in `report.json`."""
    cpus.fit_threads_to_cpus()
    pcfg = ctx.cfg.prune
    norm = data.Normalizer.from_manifest(data.read_manifest(data_dir))
    x, y = data.load_split(data_dir, "target", "train")
    val = data.load_imageset(data_dir, "target", "val")
    bs = ctx.cfg.distill.train.batch_size
    calibration = [
        (norm(x[i : i + bs]), y[i : i + bs]) for i in range(0, min(len(x), bs * pcfg.calibration_batches), bs)
    ]
    reports = []
    with ctx.child("prune", "prune", {"kdflow.importance": pcfg.importance}):
        tracking.log_params(pcfg.model_dump())
        for ratio in pcfg.ratios:
            net, spec = checkpoint.load(teacher_dir)
            with timing.compute():
                rep = pruning.prune(
                    net,
                    norm(x[:8]),
                    ratio,
                    spec["arch"],
                    pcfg.importance,
                    pcfg.global_pruning,
                    pcfg.round_to,
                    calibration,
                )
                pruned_val_top1 = accuracy(predict(net, val.x, norm), val.y)
            checkpoint.save(net, spec, pruned_dir(out_dir, ratio))
            row = {
                **asdict(rep),
                "param_reduction": rep.param_reduction,
                "mac_reduction": rep.mac_reduction,
                "val_top1_before_finetune": pruned_val_top1,
            }
            # one name per quantity, the ratio (in percent) as the step: a series over the ratios
            tracking.log_metrics({f"ratio/{k}": v for k, v in row.items() if k not in ("importance", "ratio")},
                                 step=round(100 * ratio))  # fmt: skip
            reports.append(row)
        tracking.log_dict({"reports": reports}, "prune_report.json")
    (Path(out_dir) / "report.json").write_text(json.dumps(reports, indent=1))
    return reports
