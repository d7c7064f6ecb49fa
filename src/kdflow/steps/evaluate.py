"""Step 5, evaluation: what each candidate of one distill step is worth, on the test split."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from kdflow import data, deploy, evaluate, registry, tracking
from kdflow.evaluate import predict
from kdflow.models import checkpoint
from kdflow.runtime import cpus, timing
from kdflow.steps.context import (
    ONNX_FILE,
    StepContext,
    candidate_dirs,
    export_onnx,
    log_onnx,
    ort_profile,
    profile,
    read_info,
    seed_dir,
    splits,
)

INT8_SUFFIX = "-int8"  # a quantized candidate's name: its FP32 candidate's and this
VAL_KEYS = ("val_top1", "val_top5", "val_loss")  # what the selection policy may read of the validation split


def evaluate_candidates(ctx: StepContext, data_dir: str, teacher_dir: str, student_dir: str, report_path: str) -> list:
    """Test-split accuracy, calibration, agreement with the teacher, size and latency of each candidate that
    one distill step trained, plus the validation metrics the policy selects on; each candidate also exported
    to ONNX (checked, timed, logged next to its pt2 model) and, with `quantize.enabled`, quantized to INT8 as a
    candidate of its own (`<candidate>-int8`, after the FP32 ones). One report per candidate, all in
    `report_path`."""
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
        teacher_ort = teacher_onnx_latency(cfg, teacher_dir, tgt["test"].x)

    def versus_teacher(metrics: dict) -> dict:  # compression, retention and speed-ups over the teacher
        return {**relative_to_teacher(metrics, teacher_metrics), **speedup(metrics, teacher_metrics, teacher_ort, cfg)}

    reports, quantized = [], []
    with tempfile.TemporaryDirectory(prefix="kdflow-onnx-") as tmp:
        for cdir in candidate_dirs(student_dir):
            student, _ = checkpoint.load(cdir)
            info = read_info(cdir)
            onnx_path = Path(tmp) / f"{info['name']}.onnx" if cfg.export.onnx else None
            report = _evaluate_one(ctx, student, cdir, info, tgt, t_test, norm, classes, data_dir, onnx_path)
            report["metrics"].update(versus_teacher(report["metrics"]))
            _log(info["run_id"], info["name"], report, onnx_path, data_dir)
            reports.append(report)
            if cfg.quantize.enabled:
                q = quantize_candidate(ctx, info, onnx_path, report["metrics"], tgt, t_test, classes, tmp)
                q["metrics"].update(versus_teacher(q["metrics"]))
                _log(q["run_id"], q["name"], q, None, data_dir)
                quantized.append(q)
    reports += quantized
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(json.dumps(reports, indent=1))
    return reports


def _evaluate_one(ctx, student, cdir, info, tgt, t_test, norm, classes, data_dir, onnx_path) -> dict:
    """One FP32 candidate's report: its metrics (with its ONNX export's parity and latency when `onnx_path`)."""
    cfg = ctx.cfg
    with timing.compute():
        s_test = predict(student, tgt["test"].x, norm)
        metrics, cm = evaluate.classification_report(s_test, tgt["test"].y, len(classes), cfg.evaluate.ece_bins)
        val, _ = evaluate.classification_report(
            predict(student, tgt["val"].x, norm), tgt["val"].y, len(classes), cfg.evaluate.ece_bins, prefix="val"
        )
        metrics.update({k: val[k] for k in VAL_KEYS if k in val})
        metrics["teacher_agreement"] = evaluate.agreement(s_test, t_test)
        metrics.update(profile(student, norm, data_dir, cfg, cdir))
    if onnx_path is not None:
        metrics.update(export_onnx(info["name"], student, norm, data_dir, cfg, onnx_path))
    correct = (s_test.argmax(1) == tgt["test"].y).int().tolist()  # per test image: the paired evidence's input
    by_seed = [correct]
    if len(info.get("seeds", [])) > 1:  # the further seeds' models: the recipe's spread
        with timing.compute():
            by_seed += seed_metrics(cdir, info["seeds"], metrics, tgt, norm, len(classes), cfg.evaluate.ece_bins)
    report = {
        "name": info["name"],
        "metrics": metrics,
        "confusion_matrix": cm.tolist(),
        "classes": classes,
        "test_correct": correct,
    }
    if len(by_seed) > 1:
        report["seeds"], report["test_correct_seeds"] = info["seeds"], by_seed
    return report


def _log(run_id: str, name: str, report: dict, onnx_path: Path | None, data_dir: str) -> None:
    """A report's metrics and confusion matrix into its candidate's run; its ONNX model next to the pt2 one."""
    with tracking.reopen(run_id):
        tracking.log_metrics(report["metrics"])
        cm = np.asarray(report["confusion_matrix"])
        tracking.log_figure(evaluate.confusion_figure(cm, report["classes"], f"{name} (test)"), "confusion_matrix.png")
        if onnx_path is not None:
            report["onnx_model_uri"] = log_onnx(onnx_path, data_dir)


def teacher_onnx_latency(cfg, teacher_dir: str, x) -> dict[str, float]:
    """The teacher's ONNX Runtime latency (`deploy.ort_profile` keys), timed in this step beside its candidates
    so a speed-up compares two models timed under the same conditions; empty without an ONNX export."""
    path = Path(teacher_dir) / ONNX_FILE
    if not cfg.export.onnx or not path.exists():
        return {}
    return ort_profile(path, x, cfg)


def quantize_candidate(ctx: StepContext, info: dict, fp32_path: Path, fp32: dict, tgt, t_test, classes, tmp) -> dict:
    """The INT8 candidate of one FP32 candidate: its ONNX model quantized (`deploy.quantize_int8`, calibrated on a
    seeded draw of target training images), scored in ONNX Runtime like any candidate, in a run of its own that
    holds the INT8 model (its lineage: the FP32 candidate and run, the calibration set's hash)."""
    cfg, q = ctx.cfg, ctx.cfg.quantize
    name = f"{info['name']}{INT8_SUFFIX}"
    calibration = deploy.calibration_set(tgt["train"].x, q.calibration_images, cfg.seed)
    calib_hash = deploy.data_hash(calibration)
    with timing.compute():
        path = deploy.quantize_int8(fp32_path, calibration, Path(tmp) / f"{name}.onnx", q.method, q.per_channel)
        deploy.set_classes(path, classes)
        sess = deploy.session(path, cfg.evaluate.latency_threads)
        s_test, s_val = deploy.run(sess, tgt["test"].x), deploy.run(sess, tgt["val"].x)
        bins = cfg.evaluate.ece_bins
        metrics, cm = evaluate.classification_report(s_test, tgt["test"].y, len(classes), bins)
        val, _ = evaluate.classification_report(s_val, tgt["val"].y, len(classes), bins, prefix="val")
        metrics.update({k: val[k] for k in VAL_KEYS if k in val})
        metrics["teacher_agreement"] = evaluate.agreement(s_test, t_test)
        ort = ort_profile(path, tgt["test"].x, cfg)
    metrics.update({k: fp32[k] for k in ("params", "flops", "macs")})
    metrics.update(ort)
    metrics["size_bytes"] = ort["onnx_size_bytes"]
    for b in cfg.evaluate.latency_batch_sizes:  # it ships in ONNX Runtime only: that is its latency
        metrics[f"latency_ms_b{b}"] = ort[f"ort_latency_ms_b{b}"]
        metrics[f"latency_iqr_ms_b{b}"] = ort[f"ort_latency_iqr_ms_b{b}"]
        metrics[f"int8_speedup_b{b}"] = fp32[f"ort_latency_ms_b{b}"] / ort[f"ort_latency_ms_b{b}"]
    metrics["int8_test_top1_drop"] = fp32["test_top1"] - metrics["test_top1"]
    tags = {
        **info["tags"],
        "kdflow.candidate": name,
        registry.QUANTIZED_FROM_TAG: info["name"],
        registry.CALIBRATION_HASH_TAG: calib_hash,
        "kdflow.fp32_run_id": info["run_id"],
        "kdflow.precision": "int8",
        "kdflow.runtime": "onnxruntime",
    }
    with ctx.child(name, "evaluate", tags) as run:
        tracking.log_params({f"quantize.{k}": v for k, v in q.model_dump().items()})
        tracking.log_params({"quantize.calibration_count": len(calibration), "quantize.format": "QDQ"})
        model_uri = tracking.log_onnx_model(path, tgt["val"].x[:4].float(), classes)
    return {
        "name": name,
        "metrics": metrics,
        "confusion_matrix": cm.tolist(),
        "classes": classes,
        "test_correct": (s_test.argmax(1) == tgt["test"].y).int().tolist(),
        "quantized_from": info["name"],
        "run_id": run.info.run_id,
        "model_uri": model_uri,
        "onnx_model_uri": model_uri,
        "tags": tags,
    }


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


def speedup(metrics: dict, teacher: dict, teacher_ort: dict, cfg) -> dict:
    """Is it really faster? The measured latency speed-up over the teacher next to the MAC ratio. In ONNX
    Runtime (the teacher timed in this step, `teacher_onnx_latency`) at every batch size (`ort_speedup_b<b>`)
    when models are exported; `speedup` is the one at `evaluate.speedup_at` (PyTorch eager, from the teacher
    step's timing, without an export); `speedup_share` = speedup / MAC ratio, and `speedup_flagged` is 1 for a
    candidate with fewer MACs than the teacher whose share is below `evaluate.min_speedup_share`."""
    b = cfg.evaluate.speedup_at
    out = {"mac_ratio": teacher["macs"] / metrics["macs"]}
    if teacher_ort:
        for size in cfg.evaluate.latency_batch_sizes:
            out[f"ort_speedup_b{size}"] = teacher_ort[f"ort_latency_ms_b{size}"] / metrics[f"ort_latency_ms_b{size}"]
        out["speedup"] = out[f"ort_speedup_b{b}"]
    else:
        out["speedup"] = teacher[f"latency_ms_b{b}"] / metrics[f"latency_ms_b{b}"]
    out["speedup_share"] = out["speedup"] / out["mac_ratio"]
    flagged = out["mac_ratio"] > 1 and out["speedup_share"] < cfg.evaluate.min_speedup_share
    out["speedup_flagged"] = float(flagged)
    return out
