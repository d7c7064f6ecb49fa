"""Step 5, evaluation: what each candidate of one distill step is worth, on the test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kdflow import data, evaluate, tracking
from kdflow.evaluate import predict
from kdflow.models import checkpoint
from kdflow.runtime import cpus, timing
from kdflow.steps.context import StepContext, candidate_dirs, profile, read_info, seed_dir, splits

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
        correct = (s_test.argmax(1) == tgt["test"].y).int().tolist()  # per test image: the paired evidence's input
        by_seed = [correct]
        if len(info.get("seeds", [])) > 1:  # the further seeds' models: the recipe's spread
            with timing.compute():
                by_seed += seed_metrics(cdir, info["seeds"], metrics, tgt, norm, len(classes), cfg.evaluate.ece_bins)
        metrics.update(relative_to_teacher(metrics, teacher_metrics))
        with tracking.reopen(info["run_id"]):
            tracking.log_metrics(metrics)
            figure = evaluate.confusion_figure(cm, classes, f"{info['name']} (test)")
            tracking.log_figure(figure, "confusion_matrix.png")
        report = {
            "name": info["name"],
            "metrics": metrics,
            "confusion_matrix": cm.tolist(),
            "classes": classes,
            "test_correct": correct,
        }
        if len(by_seed) > 1:
            report["seeds"], report["test_correct_seeds"] = info["seeds"], by_seed
        reports.append(report)
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(json.dumps(reports, indent=1))
    return reports


def seed_metrics(cdir, seeds: list[int], metrics: dict, tgt: dict, norm, classes: int, bins: int) -> list[list[int]]:
    """Score the candidate's further seeds (`distill.seeds`) and fold them into `metrics`: the validation
    metrics the policy reads become the mean over every seed (selection judges the recipe, not one draw of
    it), with `val_top1_std`; the test metrics stay the first seed's model's (the one registered and gated),
    with `test_top1_mean` and `test_top1_std` over the seeds beside them. Returns the further seeds'
    per-image test correctness, in `seeds` order."""
    val = {k: [metrics[k]] for k in VAL_KEYS if k in metrics}
    test, correct = [metrics["test_top1"]], []
    for seed in seeds[1:]:
        model, _ = checkpoint.load(seed_dir(cdir, seed))
        logits = predict(model, tgt["test"].x, norm)
        right = logits.argmax(1) == tgt["test"].y
        correct.append(right.int().tolist())
        test.append(float(right.float().mean()))
        v, _ = evaluate.classification_report(predict(model, tgt["val"].x, norm), tgt["val"].y, classes, bins, "val")
        for k in val:
            val[k].append(v[k])
    metrics.update({k: float(np.mean(vs)) for k, vs in val.items()})
    metrics["val_top1_std"] = float(np.std(val["val_top1"], ddof=1))
    metrics["test_top1_mean"], metrics["test_top1_std"] = float(np.mean(test)), float(np.std(test, ddof=1))
    metrics["seeds"] = len(seeds)
    return correct


def relative_to_teacher(metrics: dict, teacher: dict) -> dict:
    """Compression (teacher params / student params), teacher retention (val top-1 ratio: the split the policy's
    `min_teacher_retention` reads) and batch-1 speed-up."""
    out = {"compression": teacher["params"] / metrics["params"]}
    if teacher["val_top1"] > 0:  # a teacher that gets nothing right has nothing to retain
        out["teacher_retention"] = metrics["val_top1"] / teacher["val_top1"]
    out["speedup_b1"] = teacher["latency_ms_b1"] / metrics["latency_ms_b1"] if "latency_ms_b1" in teacher else 0.0
    return out
