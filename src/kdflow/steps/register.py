"""Step 6, registration: every candidate and the teacher into the MLflow registry; the policy's pick becomes
the champion only if it beats the current one on the same test data."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kdflow import data, evaluate, evidence, registry, report, tracking
from kdflow.config import Config
from kdflow.data import ImageSet
from kdflow.stats import Gain, paired_gain
from kdflow.steps.context import StepContext, candidate_dirs, read_info

WEAK_TEACHER_TAG = "kdflow.weak_teacher"  # the teacher is below a student trained without it (on validation)


def register(
    ctx: StepContext, data_dir: str, teacher_dir: str, student_dirs: list[str], report_paths: list[str], out_path: str
) -> dict:
    """Register the teacher and every candidate; promote the policy's pick if it beats the champion. Writes and
    returns the summary: the decision, the teacher's and every candidate's metrics and versions, the policy."""
    cfg = ctx.cfg
    manifest = data.read_manifest(data_dir)
    reports = {r["name"]: r for p in report_paths for r in json.loads(Path(p).read_text())}  # every evaluate step's
    candidates, scored = _candidates(student_dirs, reports)
    teacher_info = read_info(teacher_dir)
    test = data.load_imageset(data_dir, "target", "test")
    # a registered model's test logits, computed at most once (the gate may need its score and its predictions)
    logits_of = functools.cache(functools.partial(_logits, cfg, manifest, test))
    rescore = rescorer(cfg, test, logits_of)
    ev = evidence.gather(scored, teacher_info["metrics"]["val_top1"])
    for c in candidates:  # the gain over the same student's ce, on the candidate's run and its version's tags
        c.metrics.update(ev.metrics(c.name))
        if ev.metrics(c.name):
            tracking.log_metrics_to(c.run_id, ev.metrics(c.name))
        if ev.weak_teacher and c.name in ev.baseline:
            c.tags[WEAK_TEACHER_TAG] = "true"
            tracking.set_tags_on(c.run_id, {WEAK_TEACHER_TAG: "true"})
    if ev.weak_teacher:
        tracking.set_tags_on(ctx.parent_id, {WEAK_TEACHER_TAG: "true"})
        print(f"{tracking.PROGRESS_PREFIX} {ev.weak_teacher_reason}", flush=True)
    val_images = manifest["tasks"]["target"]["counts"]["val"]
    decision = None
    try:  # all or nothing: if anything after the registration fails, its versions and alias move are undone
        with ctx.child("register", "register") as run:
            decision = registry.register_and_promote(
                tracking.client(),
                cfg.registry,
                candidates,
                teacher_info["metrics"],
                manifest["target_test_hash"],
                rescore,
                teacher_uri=teacher_info["model_uri"],
                val_images=val_images,
                paired=pairing(test, logits_of, _registered_correct(reports)),
                teacher_tags=_teacher_tags(teacher_info),
            )
            summary = {
                "decision": asdict(decision),
                "evidence": ev.summary(),
                "teacher": {"version": decision.teacher_version, **teacher_info["metrics"]},
                "candidates": {
                    c.name: {"version": decision.versions[c.name], **c.metrics, **_chose(c)} for c in candidates
                },
                "model_name": cfg.registry.model_name,
                "policy": cfg.registry.policy.model_dump(),
                "speedup": _speedup_note(cfg),
            }
            tracking.log_dict(summary, "decision.json")
            tracking.set_tags(
                {
                    "kdflow.promoted": str(decision.promoted),
                    "kdflow.selected": str(decision.selected),
                    WEAK_TEACHER_TAG: str(ev.weak_teacher).lower(),
                }
            )
            tracking.log_metrics({"promoted": float(decision.promoted)})
            summary["register_run_id"] = run.info.run_id
        summary["report"] = on_parent(ctx, summary)
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(summary, indent=1))
    except BaseException:
        if decision is not None:  # (a failure inside register_and_promote undid its own writes)
            registry.undo(tracking.client(), cfg.registry, decision)
        raise
    return summary


PARENT_HEADLINE = ("val_top1", "test_top1", "params", "macs", "latency_ms_b1")  # on the parent, per role


def on_parent(ctx: StepContext, summary: dict) -> str:
    """What the pipeline's parent run carries, so pipeline runs compare at a glance: the teacher's and the
    champion's headline metrics (`teacher.test_top1`, `champion.test_top1`, ...), the summary (what
    `kdflow show` reads back) and the report (`report/`: the trade-off figure, report.md, report.html).
    Returns the report page's artifact URI."""
    import tempfile

    champion = _champion_metrics(ctx.cfg.registry, summary)
    metrics = {f"teacher.{k}": summary["teacher"][k] for k in PARENT_HEADLINE if k in summary["teacher"]}
    metrics.update({f"champion.{k}": v for k, v in champion.items()})
    tracking.log_metrics_to(ctx.parent_id, metrics)
    tracking.set_tags_on(
        ctx.parent_id,
        {"kdflow.champion_version": str(summary["decision"]["champion_version"]),
         "kdflow.promoted": str(summary["decision"]["promoted"])},
    )  # fmt: skip
    tracking.log_dict_to(ctx.parent_id, summary, tracking.SUMMARY_ARTIFACT)
    with tempfile.TemporaryDirectory(prefix="kdflow-report-") as tmp:
        report.write(summary, tmp)
        return tracking.log_artifacts_to(ctx.parent_id, tmp, tracking.REPORT_DIR) + f"/{report.HTML}"


def _champion_metrics(cfg, summary: dict) -> dict[str, float]:
    """The champion's headline metrics after the decision: a candidate of this run's, else its version's tags."""
    v = summary["decision"]["champion_version"]
    if v is None:
        return {}
    mine = [c for c in summary["candidates"].values() if c["version"] == v]
    source = mine[0] if mine else tracking.client().get_model_version(cfg.model_name, str(v)).tags
    out = {k: float(source[k]) for k in PARENT_HEADLINE if k in source}
    out["version"] = float(v)
    return out


def _teacher_tags(teacher_info: dict) -> dict[str, str]:
    """The teacher's version names its ONNX model, as the candidates' versions do."""
    uri = teacher_info.get("onnx_model_uri")
    return {registry.ONNX_URI_TAG: uri} if uri else {}


def _speedup_note(cfg: Config) -> dict:
    """How the candidates' `speedup` was measured (`steps.evaluate.speedup`), for the summary and its table."""
    return {
        "runtime": "onnxruntime" if cfg.export.onnx else "pytorch",
        "batch": cfg.evaluate.speedup_at,
        "threads": cfg.evaluate.latency_threads,
        "min_share": cfg.evaluate.min_speedup_share,
    }


def _chose(c: registry.Candidate) -> dict:
    """A search candidate's choice, for the summary (empty for a fixed candidate)."""
    if evidence.SEARCH_TAG not in c.tags:
        return {}
    return {"search_choice": c.tags.get("kdflow.search_settings", "")}


def _candidates(
    student_dirs: list[str], reports: dict[str, dict]
) -> tuple[list[registry.Candidate], list[evidence.Scored]]:
    """Every candidate the distill steps trained, with the metrics its evaluation reported, then every INT8
    candidate the evaluate steps quantized (after the FP32 ones: their versions name the FP32 version); and the
    FP32 candidates as the evidence sees them (student, objective kind, per-image test correctness). `reports`:
    the evaluate steps' reports by candidate name."""
    out, scored = [], []
    for d in (c for group in student_dirs for c in candidate_dirs(group)):
        info = read_info(d)
        if info["name"] not in reports:
            raise ValueError(f"candidate {info['name']!r} has no evaluation report")
        report, tags = reports[info["name"]], dict(info["tags"])
        metrics = dict(report["metrics"])
        if report.get("onnx_model_uri"):
            tags[registry.ONNX_URI_TAG] = report["onnx_model_uri"]
        out.append(registry.Candidate(info["name"], metrics, info["run_id"], info["model_uri"], tags))
        _check_per_image(info["name"], report)
        correct = np.asarray(report.get("test_correct_seeds", [report["test_correct"]]), dtype=bool)  # (S, N)
        init = tags.get(evidence.INIT_TAG, "pruned")
        student, kind = tags[evidence.STUDENT_TAG], tags[evidence.LOSS_TAG]
        searched = evidence.SEARCH_TAG in tags
        scored.append(evidence.Scored(info["name"], student, kind, metrics, correct, init, searched))
    for r in (r for r in reports.values() if r.get("quantized_from")):  # a copy of a candidate: no evidence of its own
        _check_per_image(r["name"], r)
        tags = {**r["tags"], registry.ONNX_URI_TAG: r["model_uri"]}
        out.append(registry.Candidate(r["name"], dict(r["metrics"]), r["run_id"], r["model_uri"], tags))
    return out, scored


def _check_per_image(name: str, report: dict) -> None:
    if "test_correct" not in report:  # checked before anything is written
        raise ValueError(
            f"candidate {name!r}: its evaluation report has no per-image test results (test_correct); "
            "run its evaluate step again"
        )


def _registered_correct(reports: dict[str, dict]) -> dict[str, np.ndarray]:
    """Each candidate's per-image test correctness, of the model that is registered (a candidate's first seed)."""
    return {name: np.asarray(r["test_correct"], dtype=bool) for name, r in reports.items()}


def pairing(
    test: ImageSet, logits_of: Callable[[str], torch.Tensor], correct: dict[str, np.ndarray]
) -> Callable[[str, str], Gain]:
    """For the significance gate: a candidate's paired gain over a registered model on this run's test images."""

    def paired(name: str, model_uri: str) -> Gain:
        return paired_gain(correct[name], (logits_of(model_uri).argmax(1) == test.y).numpy())

    return paired


def _logits(cfg: Config, manifest: dict, test: ImageSet, model_uri: str) -> torch.Tensor:
    """A registered model's logits on the test split; a clear error when it cannot score this task."""
    num_classes = manifest["tasks"]["target"]["num_classes"]
    served = tracking.load_logits_fn(model_uri)  # a pt2 model, or an INT8 champion's ONNX model
    with torch.no_grad():
        try:
            logits = torch.cat([served(test.x[i : i + 256].float()) for i in range(0, len(test), 256)])
        except Exception as err:  # a champion for another input shape or class count
            raise ValueError(
                f"the current {cfg.registry.alias} of {cfg.registry.model_name!r} ({model_uri}) cannot be scored "
                f"on this run's test data ({err}); use another registry.model_name for this task"
            ) from None
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"the current {cfg.registry.alias} ({model_uri}) predicts {logits.shape[1]} classes, "
            f"this task has {num_classes}"
        )
    return logits


def rescorer(cfg: Config, test: ImageSet, logits_of: Callable[[str], torch.Tensor]) -> Callable[[str], float]:
    """The champion metric of a registered model (`models:/...`) on this run's test split: how the current
    champion is scored when its stored score was measured on other test data."""

    k = 5 if cfg.registry.champion_metric == "test_top5" else 1

    def rescore(model_uri: str) -> float:
        return evaluate.topk_accuracy(logits_of(model_uri), test.y, k)

    return rescore
