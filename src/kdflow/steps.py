"""The six pipeline steps as plain functions: config and directories in, files and metrics out.

Each KFP component (components/) is a thin adapter around exactly one of these; tests and notebooks call them
directly. A step never reads another step's memory, only its output files, so the same function runs in a test,
under kfp.local, and in a pod on a GPU node.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kdflow import checkpoint, cpus, data, distributed, evaluate, losses, models, registry, timing, tracking
from kdflow.config import Config, config_from_json
from kdflow.stepserver import PARALLEL_THREADS_ENV
from kdflow.train import (
    Split,
    Student,
    TeacherOutputs,
    accuracy,
    compute_teacher_outputs,
    fit,
    fit_many,
    predict,
    resolve_device,
    seed_everything,
    tabulate_teacher,
    teacher_outputs_key,
)

INFO_FILE = "info.json"
GROUP_FILE = "candidates.json"  # a distill step's output: the names of its candidates, each in a subfolder
TEACHER_OUTPUTS_FILE = "teacher_outputs.pt"


def _share_cores() -> None:
    """Steps inside the ParallelFor run side by side locally: each takes its share of the cores, or it would
    claim every one. Elsewhere (a pod) torch's threads are capped at the CPUs the container's quota allows."""
    threads = os.environ.get(PARALLEL_THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
    else:
        cpus.fit_threads_to_cpus()


@dataclass
class StepContext:
    """What every step needs: the validated config and where its MLflow runs go."""

    cfg: Config
    tracking_uri: str
    experiment_id: str
    parent_id: str
    pipeline_run_id: str

    @classmethod
    def open(cls, config_json: str, tracking_uri: str, pipeline_run_id: str, pipeline_run_name: str) -> StepContext:
        cfg = config_from_json(config_json)
        uri = tracking.resolve_tracking_uri(tracking_uri or None)
        exp = tracking.ensure_experiment(cfg.experiment, uri)  # also points this process at the store
        parent = tracking.parent_run_id(exp, pipeline_run_id, pipeline_run_name or pipeline_run_id, cfg.flat())
        return cls(cfg, uri, exp, parent, pipeline_run_id)

    @contextlib.contextmanager
    def child(self, name: str, step: str, tags: dict[str, str] | None = None):
        """A child run of the pipeline's parent run; a failure marks both FAILED in MLflow."""
        try:
            with tracking.child_run(self.experiment_id, self.parent_id, name, step, tags) as run:
                yield run
        except BaseException:
            tracking.end_run(self.parent_id, "FAILED")
            raise


class ServingModel(nn.Sequential):
    """What is registered: normalisation + network, so callers send raw pixels as float32 (N, C, H, W) in
    [0, 255] and get logits (N, classes)."""

    def __init__(self, normalizer: data.Normalizer, net: nn.Module):
        super().__init__(normalizer, net)


# ----------------------------------------------------------------------------------------------- helpers


def _splits(data_dir: str, task: str) -> dict[str, Split]:
    return {s: Split(*data.load_split(data_dir, task, s)) for s in data.SPLITS}


def _example(normalizer: data.Normalizer, data_dir: str, n: int = 8) -> torch.Tensor:
    x, _ = data.load_split(data_dir, "target", "train")
    return normalizer(x[:n])


def _write_info(directory: str | Path, info: dict) -> None:
    (Path(directory) / INFO_FILE).write_text(json.dumps(info, indent=1))


def read_info(directory: str | Path) -> dict:
    return json.loads((Path(directory) / INFO_FILE).read_text())


def _log_servable(model: nn.Module, normalizer: data.Normalizer, data_dir: str) -> str:
    x, _ = data.load_split(data_dir, "target", "val")
    return tracking.log_model(ServingModel(normalizer, model), x[:4].float())


def profile(model: nn.Module, normalizer: data.Normalizer, data_dir: str, cfg: Config, ckpt_dir: str) -> dict:
    """Size and speed of a model: params, serialized bytes, FLOPs/MACs per image, CPU latency per batch size."""
    with timing.compute():
        return _profile(model, normalizer, data_dir, cfg, ckpt_dir)


def _profile(model: nn.Module, normalizer: data.Normalizer, data_dir: str, cfg: Config, ckpt_dir: str) -> dict:
    example = _example(normalizer, data_dir).cpu()
    model = model.cpu().eval()
    out = {"params": models.count_params(model), "size_bytes": checkpoint.file_size(ckpt_dir)}
    out["flops"] = evaluate.flops(model, example)
    out["macs"] = out["flops"] // 2
    for b in cfg.evaluate.latency_batch_sizes:
        out[f"latency_ms_b{b}"] = evaluate.cpu_latency_ms(
            model, example, b, cfg.evaluate.latency_warmup, cfg.evaluate.latency_repeats, cfg.evaluate.latency_threads
        )
    return out


# -------------------------------------------------------------------------------------------- 1. data prep


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
        tracking.log_dict(ctx.cfg.model_dump(mode="json"), "config.json")
        tracking.set_tags({"kdflow.data_hash": manifest["content_hash"]})


# --------------------------------------------------------------------------------------- 2. teacher training


def train_teacher(ctx: StepContext, data_dir: str, out_dir: str) -> dict:
    """Pretrain on the source task, swap in a new head, fine-tune on the target task (transfer learning).

    With several GPUs (or `cluster.teacher_processes` > 1) this process opens the MLflow run and launches one
    torchrun worker per process (`kdflow.distributed`), which train in DDP; rank 0 logs into the run and writes
    the files, and the metrics are read back from them."""
    cpus.fit_threads_to_cpus()  # it runs alone: every core its container may use
    # the class count is known now: a policy metric this task cannot have fails here, not after all the training
    registry.check_metrics(ctx.cfg.registry, data.read_manifest(data_dir)["tasks"]["target"]["num_classes"])
    nproc = distributed.teacher_processes(ctx.cfg)
    tags = {"kdflow.arch": ctx.cfg.teacher.arch}
    if nproc > 1:
        with ctx.child("teacher", "teacher", {**tags, "kdflow.teacher_processes": str(nproc)}) as run:
            distributed.launch_teacher(ctx, data_dir, out_dir, run.info.run_id, nproc)
        return read_info(out_dir)["metrics"]
    return _train_teacher(ctx, data_dir, out_dir, resolve_device(ctx.cfg.device), ctx.child("teacher", "teacher", tags))


def train_teacher_rank(ctx: StepContext, data_dir: str, out_dir: str, run_id: str, device: torch.device) -> dict:
    """One torchrun worker's part of `train_teacher`: every rank trains, rank 0 alone logs into the step's
    MLflow run `run_id` and writes the checkpoint. Returns the metrics on rank 0, {} elsewhere."""
    scope = tracking.reopen(run_id) if distributed.is_main() else contextlib.nullcontext()
    return _train_teacher(ctx, data_dir, out_dir, device, scope)


def _train_teacher(
    ctx: StepContext, data_dir: str, out_dir: str, device: torch.device, scope: contextlib.AbstractContextManager
) -> dict:
    """The teacher step's work inside `scope`, the MLflow run it logs into (none on ranks other than 0)."""
    cfg, tcfg = ctx.cfg, ctx.cfg.teacher
    main = distributed.is_main()
    manifest = data.read_manifest(data_dir)
    norm = data.Normalizer.from_manifest(manifest)
    src, tgt = _splits(data_dir, "source"), _splits(data_dir, "target")
    in_ch = manifest["tasks"]["source"]["shape"][0]
    seed_everything(cfg.seed)
    kwargs = dict(tcfg.arch_kwargs)
    if tcfg.pretrained and tcfg.arch in ("resnet18", "mobilenet_v3_small"):
        kwargs["weights"] = tcfg.pretrained
    net = models.build(tcfg.arch, in_ch, manifest["tasks"]["source"]["num_classes"], **kwargs)
    if tcfg.pretrained and "weights" not in kwargs:
        _load_compatible(net, tcfg.pretrained)

    with scope as run:
        if main:
            tracking.log_params(
                {
                    "arch": tcfg.arch,
                    "arch_kwargs": json.dumps(tcfg.arch_kwargs),
                    **{f"pretrain.{k}": v for k, v in tcfg.pretrain.model_dump().items()},
                    **{f"finetune.{k}": v for k, v in tcfg.finetune.model_dump().items()},
                }
            )
        with timing.compute():
            pre = fit(
                net,
                src["train"],
                src["val"],
                tcfg.pretrain,
                norm,
                seed=cfg.seed,
                device=device,
                on_epoch=tracking.epoch_logger("teacher pretrain", tcfg.pretrain.epochs, "pretrain_"),
            )
            source_test = accuracy(predict(net, src["test"].x, norm), src["test"].y) if main else None
            models.replace_head(net, manifest["tasks"]["target"]["num_classes"], tcfg.arch)
            fine = fit(
                net,
                tgt["train"],
                tgt["val"],
                tcfg.finetune,
                norm,
                seed=cfg.seed + 1,
                device=device,
                on_epoch=tracking.epoch_logger("teacher finetune", tcfg.finetune.epochs, "finetune_"),
            )
        if not main:  # every rank holds the same weights; rank 0 evaluates, logs and writes them
            return {}
        spec = checkpoint.make_spec(tcfg.arch, in_ch, manifest["tasks"]["target"]["num_classes"], tcfg.arch_kwargs)
        checkpoint.save(net, spec, out_dir)
        with timing.compute():
            metrics = {
                "pretrain_best_val_top1": pre.best_val_acc,
                "pretrain_source_test_top1": source_test,
                "val_top1": accuracy(predict(net, tgt["val"].x, norm), tgt["val"].y),
                "test_top1": accuracy(predict(net, tgt["test"].x, norm), tgt["test"].y),
                **profile(net, norm, data_dir, cfg, out_dir),
            }
        tracking.log_metrics(metrics)
        model_uri = _log_servable(net, norm, data_dir)
        save_teacher_outputs(cfg, net, norm, data_dir, manifest, out_dir)
        _write_info(
            out_dir,
            {
                "run_id": run.info.run_id,
                "model_uri": model_uri,
                "metrics": metrics,
                "finetune_best_epoch": fine.best_epoch,
                "data_hash": manifest["content_hash"],
                "processes": distributed.world_size(),
            },
        )
    return metrics


def save_teacher_outputs(cfg: Config, net: nn.Module, norm: data.Normalizer, data_dir: str, manifest: dict, out_dir):
    """The teacher's logits on the distillation transfer sets, computed once here for every distill step and
    epoch, keyed by the teacher's weights and the data's content hash. With random crops: a table over every
    crop variant of the target images, when that pays (`train.tabulate_teacher`). Skipped when no loss uses
    the teacher's logits without its features (hint losses run the teacher per batch under augmentation)."""
    dcfg = cfg.distill
    augment = dcfg.train.augment
    teacher_losses = [lc for lc in dcfg.losses if losses.needs_teacher(lc)]
    if augment != "none":
        teacher_losses = [lc for lc in teacher_losses if lc.kind != "hint"]
    if not teacher_losses:
        return
    net = net.to(resolve_device(cfg.device))  # profiling and model logging left it on the CPU
    x_target, _ = data.load_split(data_dir, "target", "train")
    with_source = augment == "none" and any(losses.uses_source_data(lc) for lc in teacher_losses)
    x_source = data.load_split(data_dir, "source", "train")[0] if with_source else None
    with timing.compute():
        key = teacher_outputs_key(net, manifest["content_hash"])
        if augment == "none":
            out = compute_teacher_outputs(net, norm, key, x_target, x_source)
        else:
            out = tabulate_teacher(net, norm, x_target, augment, dcfg.train.epochs, key)
    if out is None:  # a table would cost more teacher passes than the distill epochs: they run it per batch
        return
    blob = {"key": key, "augment": augment, "target": out.target.cpu()}
    if out.source is not None:
        blob["source"] = out.source.cpu()
    torch.save(blob, Path(out_dir) / TEACHER_OUTPUTS_FILE)


def load_teacher_outputs(teacher: nn.Module, manifest: dict, teacher_dir: str) -> TeacherOutputs | None:
    """The teacher step's cached logits if they belong to exactly this teacher and data, else None (the
    distill step then runs the teacher itself). `train.fit_many` uses them only when it trains with the
    augmentation they were computed for."""
    path = Path(teacher_dir) / TEACHER_OUTPUTS_FILE
    if not path.is_file():
        return None
    blob = torch.load(path, weights_only=True)
    if blob["key"] != teacher_outputs_key(teacher, manifest["content_hash"]):
        print(f"{tracking.PROGRESS_PREFIX} ignoring stale {path}: it belongs to another teacher or dataset")
        return None
    return TeacherOutputs(blob["key"], blob["target"], blob.get("source"), augment=blob.get("augment", "none"))


def _load_compatible(net: nn.Module, path: str) -> None:
    """Load a local state dict, skipping tensors whose shapes differ (a head for another class count)."""
    state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    own = net.state_dict()
    net.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


# ------------------------------------------------------------------------------------------------ 3. pruning


def pruned_dir(root: str | Path, ratio: float) -> Path:
    return Path(root) / f"ratio-{ratio:g}"


def prune_teacher(ctx: StepContext, data_dir: str, teacher_dir: str, out_dir: str) -> list[dict]:
    """One structurally pruned copy of the fine-tuned teacher per configured ratio (not fine-tuned yet:
    distillation trains them)."""
    from kdflow import pruning

    cpus.fit_threads_to_cpus()
    pcfg = ctx.cfg.prune
    manifest = data.read_manifest(data_dir)
    norm = data.Normalizer.from_manifest(manifest)
    x, y = data.load_split(data_dir, "target", "train")
    val = Split(*data.load_split(data_dir, "target", "val"))
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
            d = pruned_dir(out_dir, ratio)
            checkpoint.save(net, spec, d)
            row = {
                **asdict(rep),
                "param_reduction": rep.param_reduction,
                "mac_reduction": rep.mac_reduction,
                "val_top1_before_finetune": pruned_val_top1,
            }
            tracking.log_metrics({f"ratio_{ratio:g}_{k}": v for k, v in row.items() if k != "importance"})
            reports.append(row)
        tracking.log_dict({"reports": reports}, "prune_report.json")
    (Path(out_dir) / "report.json").write_text(json.dumps(reports, indent=1))
    return reports


# ------------------------------------------------------------------------------------------- 4. distillation


def candidate(cfg: Config, name: str) -> dict:
    for c in cfg.candidates():
        if c["name"] == name:
            return c
    raise ValueError(f"unknown candidate {name!r}; the config defines {[c['name'] for c in cfg.candidates()]}")


def distill(
    ctx: StepContext, names: list[str], data_dir: str, teacher_dir: str, pruned_root: str, out_dir: str
) -> dict[str, dict]:
    """Train candidates (a student × a loss each) on the target task with the teacher's soft targets.

    The candidates of one step train side by side over one data stream (`train.fit_many`): each batch's teacher
    outputs serve all of them, and they come from `teacher_outputs.pt`, which the teacher step computed once
    (without random augmentation, or as a table over every crop variant when that pays). Each candidate gets
    its own MLflow run and its own folder `out_dir/<name>`."""
    from kdflow.config import LossConfig, StudentConfig

    _share_cores()
    cfg = ctx.cfg
    if not names:
        raise ValueError("distill got no candidates")
    cands = [candidate(cfg, n) for n in names]
    manifest = data.read_manifest(data_dir)
    norm = data.Normalizer.from_manifest(manifest)
    device = resolve_device(cfg.device)
    teacher, tspec = checkpoint.load(teacher_dir)
    teacher_info = read_info(teacher_dir)
    tgt = _splits(data_dir, "target")
    loss_cfgs = {c["name"]: LossConfig(**c["loss"]) for c in cands}
    with_source = any(losses.uses_source_data(lc) for lc in loss_cfgs.values())
    source = Split(*data.load_split(data_dir, "source", "train")) if with_source else None
    cached = load_teacher_outputs(teacher, manifest, teacher_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / GROUP_FILE).write_text(json.dumps(names))

    runs, students, specs = {}, {}, {}
    try:
        for c in cands:
            name, student_cfg, loss_cfg = c["name"], StudentConfig(**c["student"]), loss_cfgs[c["name"]]
            seed_everything(cfg.seed)
            if student_cfg.from_pruned is not None:
                student, spec = checkpoint.load(pruned_dir(pruned_root, student_cfg.from_pruned))
            else:
                t = manifest["tasks"]["target"]
                student = models.build(student_cfg.arch, t["shape"][0], t["num_classes"], **student_cfg.arch_kwargs)
                spec = checkpoint.make_spec(student_cfg.arch, t["shape"][0], t["num_classes"], student_cfg.arch_kwargs)
            lineage = {
                "kdflow.candidate": name,
                "kdflow.student": student_cfg.name,
                "kdflow.student_arch": spec["arch"],
                "kdflow.prune_ratio": str(student_cfg.from_pruned) if student_cfg.from_pruned is not None else "none",
                "kdflow.loss": loss_cfg.kind,
                "kdflow.loss_name": loss_cfg.name,
                "kdflow.temperature": str(loss_cfg.temperature),
                "kdflow.alpha": str(loss_cfg.alpha),
                "kdflow.lambda": str(loss_cfg.lam),
                "kdflow.transfer": loss_cfg.transfer,
                "kdflow.teacher_run_id": teacher_info["run_id"],
                "kdflow.data_hash": manifest["content_hash"],
                "kdflow.trained_with": ",".join(names),
                tracking.PIPELINE_RUN_TAG: ctx.pipeline_run_id,
            }
            runs[name] = tracking.open_child_run(ctx.experiment_id, ctx.parent_id, name, "distill", lineage)
            tracking.log_params(  # into the run, which stays RUNNING until its model is logged
                {
                    **{f"student.{k}": v for k, v in student_cfg.model_dump().items()},
                    **{f"loss.{k}": v for k, v in loss_cfg.model_dump().items()},
                    **{f"train.{k}": v for k, v in cfg.distill.train.model_dump().items()},
                },
                run_id=runs[name],
            )
            specs[name] = (spec, lineage)
            students[name] = Student(
                student,
                loss_cfg,
                (models.hint_layer(spec["arch"]), models.hint_layer(tspec["arch"])),
                tracking.epoch_logger(f"distill {name}", cfg.distill.train.epochs, run_id=runs[name]),
            )
        # one data stream per kind of transfer set: with and without source images
        results = {}
        for stream in (False, True):
            group = [n for n in names if losses.uses_source_data(loss_cfgs[n]) == stream]
            if not group:
                continue
            with timing.compute():
                fitted = fit_many(
                    [students[n] for n in group],
                    tgt["train"],
                    tgt["val"],
                    cfg.distill.train,
                    norm,
                    seed=cfg.seed,
                    device=device,
                    teacher=teacher if any(losses.needs_teacher(loss_cfgs[n]) for n in group) else None,
                    source=source if stream else None,
                    teacher_outputs=cached,
                )
            results.update(zip(group, fitted))
        for name in names:
            student, (spec, lineage), result = students[name].model, specs[name], results[name]
            cdir = Path(out_dir) / name
            checkpoint.save(student, spec, cdir)
            with tracking.reopen(runs[name]):
                tracking.log_metrics({"best_epoch": result.best_epoch, "best_val_top1": result.best_val_acc})
                model_uri = _log_servable(student, norm, data_dir)
            _write_info(
                cdir,
                {
                    "name": name,
                    "run_id": runs[name],
                    "model_uri": model_uri,
                    "tags": lineage,
                    "best_epoch": result.best_epoch,
                },
            )
    except BaseException:
        for run_id in runs.values():
            tracking.end_run(run_id, "FAILED")
        tracking.end_run(ctx.parent_id, "FAILED")
        raise
    return {n: {"best_val_top1": results[n].best_val_acc, "best_epoch": results[n].best_epoch} for n in names}


def candidate_dirs(student_dir: str | Path) -> list[Path]:
    """The per-candidate folders of one distill step's output, in the order they were trained."""
    names = json.loads((Path(student_dir) / GROUP_FILE).read_text())
    return [Path(student_dir) / n for n in names]


# --------------------------------------------------------------------------------------------- 5. evaluation


def evaluate_candidates(ctx: StepContext, data_dir: str, teacher_dir: str, student_dir: str, report_path: str) -> list:
    """Test-split accuracy, calibration, agreement with the teacher, size and latency of each candidate that
    one distill step trained; one report per candidate, all in `report_path`."""
    _share_cores()
    cfg = ctx.cfg
    manifest = data.read_manifest(data_dir)
    norm = data.Normalizer.from_manifest(manifest)
    classes = manifest["tasks"]["target"]["classes"]
    teacher, _ = checkpoint.load(teacher_dir)
    teacher_info = read_info(teacher_dir)
    tgt = _splits(data_dir, "target")
    with timing.compute():
        t_test = predict(teacher, tgt["test"].x, norm)
    reports = []
    for cdir in candidate_dirs(student_dir):
        student, _ = checkpoint.load(cdir)
        info = read_info(cdir)
        with timing.compute():
            s_test = predict(student, tgt["test"].x, norm)
            metrics, cm = evaluate.classification_report(s_test, tgt["test"].y, len(classes), cfg.evaluate.ece_bins)
            s_val = predict(student, tgt["val"].x, norm)
            metrics["val_top1"] = accuracy(s_val, tgt["val"].y)
            if len(classes) > 5:
                metrics["val_top5"] = evaluate.topk_accuracy(s_val, tgt["val"].y, 5)
            metrics["val_loss"] = float(torch.nn.functional.cross_entropy(s_val, tgt["val"].y))
            metrics["teacher_agreement"] = evaluate.agreement(s_test, t_test)
            metrics.update(profile(student, norm, data_dir, cfg, cdir))
        t = teacher_info["metrics"]
        metrics["compression"] = t["params"] / metrics["params"]
        if t["test_top1"] > 0:  # a teacher that gets nothing right has nothing to retain
            metrics["teacher_retention"] = metrics["test_top1"] / t["test_top1"]
        metrics["speedup_b1"] = t["latency_ms_b1"] / metrics["latency_ms_b1"] if "latency_ms_b1" in t else 0.0
        with tracking.reopen(info["run_id"]):
            tracking.log_metrics(metrics)
            figure = evaluate.confusion_figure(cm, classes, f"{info['name']} (test)")
            tracking.log_figure(figure, "confusion_matrix.png")
        reports.append({"name": info["name"], "metrics": metrics, "confusion_matrix": cm.tolist(), "classes": classes})
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(json.dumps(reports, indent=1))
    return reports


# ------------------------------------------------------------------------------------------- 6. registration


def register(
    ctx: StepContext, data_dir: str, teacher_dir: str, student_dirs: list[str], report_paths: list[str], out_path: str
) -> dict:
    """Register the teacher and every candidate; promote the policy's pick if it beats the champion."""
    import mlflow

    cfg = ctx.cfg
    manifest = data.read_manifest(data_dir)
    reports = {r["name"]: r for p in report_paths for r in json.loads(Path(p).read_text())}
    candidates = []
    for d in (c for group in student_dirs for c in candidate_dirs(group)):
        info = read_info(d)
        if info["name"] not in reports:
            raise ValueError(f"candidate {info['name']!r} has no evaluation report")
        candidates.append(
            registry.Candidate(
                info["name"], reports[info["name"]]["metrics"], info["run_id"], info["model_uri"], info["tags"]
            )
        )
    teacher_info = read_info(teacher_dir)
    test = Split(*data.load_split(data_dir, "target", "test"))

    def rescore(model_uri: str) -> float:
        import mlflow.pytorch

        served = mlflow.pytorch.load_model(model_uri)
        with torch.no_grad():
            try:
                logits = torch.cat([served(test.x[i : i + 256].float()) for i in range(0, len(test), 256)])
            except Exception as err:  # a champion for another input shape or class count
                raise ValueError(
                    f"the current {cfg.registry.alias} of {cfg.registry.model_name!r} ({model_uri}) cannot be scored "
                    f"on this run's test data ({err}); use another registry.model_name for this task"
                ) from None
        if logits.shape[1] != manifest["tasks"]["target"]["num_classes"]:
            raise ValueError(
                f"the current {cfg.registry.alias} ({model_uri}) predicts {logits.shape[1]} classes, "
                f"this task has {manifest['tasks']['target']['num_classes']}"
            )
        return evaluate.topk_accuracy(logits, test.y, 5 if cfg.registry.champion_metric == "test_top5" else 1)

    with ctx.child("register", "register") as run:
        decision = registry.register_and_promote(
            mlflow.MlflowClient(),
            cfg.registry,
            candidates,
            teacher_info["metrics"],
            manifest["target_test_hash"],
            rescore,
            teacher_uri=teacher_info["model_uri"],
        )
        summary = {
            "decision": asdict(decision),
            "teacher": {"version": decision.teacher_version, **teacher_info["metrics"]},
            "candidates": {c.name: {"version": decision.versions[c.name], **c.metrics} for c in candidates},
            "model_name": cfg.registry.model_name,
            "policy": cfg.registry.policy.model_dump(),
        }
        tracking.log_dict(summary, "decision.json")
        tracking.set_tags({"kdflow.promoted": str(decision.promoted), "kdflow.selected": str(decision.selected)})
        tracking.log_metrics({"promoted": float(decision.promoted)})
        summary["register_run_id"] = run.info.run_id
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------------------------------- exit handler


def finalize(ctx: StepContext, succeeded: bool, detail: str = "") -> list[str]:
    """Close the pipeline's MLflow run with the pipeline's outcome; runs whether the steps succeeded or not
    (KFP exit handler), so a killed pod cannot leave runs RUNNING. Returns the child runs it marked FAILED."""
    return tracking.close_pipeline_run(ctx.experiment_id, ctx.parent_id, succeeded, detail)
