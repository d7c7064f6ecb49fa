"""Step 5, evaluation: what each candidate of one distill step is worth, on the test split."""

from __future__ import annotations

import json
from pathlib import Path

from kdflow import data, evaluate, tracking
from kdflow.evaluate import predict
from kdflow.models import checkpoint
from kdflow.runtime import cpus, timing
from kdflow.steps.context import StepContext, candidate_dirs, profile, read_info, splits

VAL_KEYS = ("val_top1", "val_top5", "val_loss")  # what the selection policy may read of the validation split


def evaluate_candidates(ctx: StepContext, data_dir: str, teacher_dir: str, student_dir: str, report_path: str) -> list:
    """Test-split accuracy, calibration, agreement with the teacher, size and latency of each candidate that
    one distill step trained, plus the validation metrics the policy selects on; one report per candidate,
    all in `report_path`."""
    cpus.share_cores()
    cfg = ctx.cfg
    manifest = data.read_manifest(data_dir)
    norm = data.Normalizer.from_manifest(manifest)
    classes = manifest["tasks"]["target"]["classes"]
    teacher, _ = checkpoint.load(teacher_dir)
    teacher_metrics = read_info(teacher_dir)["metrics"]
    tgt = splits(data_dir, "target")
    with timing.compute():
        t_test = predict(teacher, tgt["test"].x, norm)
    reports = []
    for cdir in candidate_dirs(student_dir):
        student, _ = checkpoint.load(cdir)
        info = read_info(cdir)
        with timing.compute():
            s_test = predict(student, tgt["test"].x, norm)
            metrics, cm = evaluate.classification_report(s_test, tgt["test"].y, len(classes), cfg.evaluate.ece_bins)
            val, _ = evaluate.classification_report(
                predict(student, tgt["val"].x, norm), tgt["val"].y, len(classes), cfg.evaluate.ece_bins, prefix="val"
            )
            metrics.update({k: val[k] for k in VAL_KEYS if k in val})
            metrics["teacher_agreement"] = evaluate.agreement(s_test, t_test)
            metrics.update(profile(student, norm, data_dir, cfg, cdir))
        metrics.update(relative_to_teacher(metrics, teacher_metrics))
        with tracking.reopen(info["run_id"]):
            tracking.log_metrics(metrics)
            figure = evaluate.confusion_figure(cm, classes, f"{info['name']} (test)")
            tracking.log_figure(figure, "confusion_matrix.png")
        correct = (s_test.argmax(1) == tgt["test"].y).int().tolist()  # per test image: the paired evidence's input
        reports.append(
            {
                "name": info["name"],
                "metrics": metrics,
                "confusion_matrix": cm.tolist(),
                "classes": classes,
                "test_correct": correct,
            }
        )
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(json.dumps(reports, indent=1))
    return reports


def relative_to_teacher(metrics: dict, teacher: dict) -> dict:
    """Compression (teacher params / student params), teacher retention (val top-1 ratio: the split the policy's
    `min_teacher_retention` reads) and batch-1 speed-up."""
    out = {"compression": teacher["params"] / metrics["params"]}
    if teacher["val_top1"] > 0:  # a teacher that gets nothing right has nothing to retain
        out["teacher_retention"] = metrics["val_top1"] / teacher["val_top1"]
    out["speedup_b1"] = teacher["latency_ms_b1"] / metrics["latency_ms_b1"] if "latency_ms_b1" in teacher else 0.0
    return out
