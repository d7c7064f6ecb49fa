"""Step 2, the teacher: pretrain on the source task, swap in a new head, fine-tune on the target task; then
the teacher's outputs on the distillation transfer sets, computed once for every distill step.

With several GPUs (or `cluster.teacher_processes` > 1) the step's process opens the MLflow run and launches
one torchrun worker per process (`kdflow.steps.teacher_ddp`); rank 0 logs into the run and writes the files.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kdflow import data, objectives, registry, tracking
from kdflow.config import Config
from kdflow.engine import ddp
from kdflow.engine.device import resolve_device, seed_everything
from kdflow.engine.loop import FitResult, fit
from kdflow.engine.resume import Checkpoints
from kdflow.engine.stream import epoch_size
from kdflow.engine.teacher_outputs import (
    TeacherOutputs,
    compute_teacher_outputs,
    tabulate_teacher,
    teacher_outputs_key,
)
from kdflow.evaluate import accuracy, predict
from kdflow.models import checkpoint, zoo
from kdflow.runtime import cpus, timing
from kdflow.steps import teacher_ddp
from kdflow.steps.context import (
    ONNX_FILE,
    StepContext,
    export_onnx,
    load_weights,
    log_onnx,
    log_servable,
    profile,
    read_info,
    splits,
    write_info,
)

TEACHER_OUTPUTS_FILE = "teacher_outputs.pt"
TORCHVISION_WEIGHTS = ("resnet18", "mobilenet_v3_small")  # architectures whose `pretrained` names torchvision weights


def train_teacher(ctx: StepContext, data_dir: str, out_dir: str) -> dict:
    """Pretrain on the source task, swap in a new head, fine-tune on the target task (transfer learning);
    returns the teacher's metrics. Its checkpoint, `info.json` and teacher outputs go to `out_dir`."""
    cpus.fit_threads_to_cpus()  # it runs alone: every core its container may use
    # the class count is known now: a policy metric this task cannot have fails here, not after all the training
    registry.check_metrics(ctx.cfg.registry, data.read_manifest(data_dir)["tasks"]["target"]["num_classes"])
    nproc = teacher_ddp.teacher_processes(ctx.cfg)
    tags = {"kdflow.arch": ctx.cfg.teacher.arch}
    if nproc > 1:
        with ctx.child("teacher", "teacher", {**tags, "kdflow.teacher_processes": str(nproc)}) as run:
            teacher_ddp.launch_teacher(ctx, data_dir, out_dir, run.info.run_id, nproc)
        return read_info(out_dir)["metrics"]
    return _train_teacher(ctx, data_dir, out_dir, resolve_device(ctx.cfg.device), ctx.child("teacher", "teacher", tags))


def train_teacher_rank(ctx: StepContext, data_dir: str, out_dir: str, run_id: str, device: torch.device) -> dict:
    """One torchrun worker's part of `train_teacher`: every rank trains, rank 0 alone logs into the step's
    MLflow run `run_id` and writes the checkpoint. Returns the metrics on rank 0, {} elsewhere."""
    scope = tracking.reopen(run_id) if ddp.is_main() else contextlib.nullcontext()
    return _train_teacher(ctx, data_dir, out_dir, device, scope)


def _train_teacher(
    ctx: StepContext, data_dir: str, out_dir: str, device: torch.device, scope: contextlib.AbstractContextManager
) -> dict:
    """The teacher step's work inside `scope`, the MLflow run it logs into (none on ranks other than 0)."""
    cfg, tcfg = ctx.cfg, ctx.cfg.teacher
    manifest = data.read_manifest(data_dir)
    norm = data.Normalizer.from_manifest(manifest)
    src, tgt = splits(data_dir, "source"), splits(data_dir, "target")  # read once for training and evaluation
    net = build_teacher(cfg, manifest)
    with scope as run:
        if ddp.is_main():
            tracking.log_params(
                {
                    "arch": tcfg.arch,
                    "arch_kwargs": json.dumps(tcfg.arch_kwargs),
                    **{f"pretrain.{k}": v for k, v in tcfg.pretrain.model_dump().items()},
                    **{f"finetune.{k}": v for k, v in tcfg.finetune.model_dump().items()},
                }
            )
        pre, fine, source_test = _fit_phases(cfg, net, manifest, norm, src, tgt, device, ctx.checkpoints)
        if not ddp.is_main():  # every rank holds the same weights; rank 0 evaluates, logs and writes them
            return {}
        return _finish(ctx, net, manifest, norm, tgt, data_dir, out_dir, run.info.run_id, pre, fine, source_test)


def build_teacher(cfg: Config, manifest: dict) -> nn.Module:
    """The teacher for the source task, seeded, from `teacher.pretrained` weights when given."""
    tcfg = cfg.teacher
    source = manifest["tasks"]["source"]
    seed_everything(cfg.seed)
    kwargs = dict(tcfg.arch_kwargs)
    if tcfg.pretrained and tcfg.arch in TORCHVISION_WEIGHTS:
        kwargs["weights"] = tcfg.pretrained
    net = zoo.build(tcfg.arch, source["shape"][0], source["num_classes"], **kwargs)
    if tcfg.pretrained and "weights" not in kwargs:  # a local state dict: skip tensors of other shapes (a head)
        state, own = load_weights(tcfg.pretrained), net.state_dict()
        net.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    return net


def _fit_phases(
    cfg: Config,
    net: nn.Module,
    manifest: dict,
    norm: data.Normalizer,
    src: dict,
    tgt: dict,
    device: torch.device,
    checkpoints: Callable[[str, str], Checkpoints | None],
) -> tuple[FitResult, FitResult, float | None]:
    """Pretraining on the source task, its test accuracy (rank 0), the new head, fine-tuning on the target; each
    phase with its epoch checkpoints (`checkpoints(step, phase)`), so an interrupted step continues there."""
    tcfg = cfg.teacher
    with timing.compute():
        log = tracking.epoch_logger("teacher pretrain", tcfg.pretrain.epochs, "pretrain/")
        kw = dict(device=device, on_epoch=log, checkpoints=checkpoints("teacher", "pretrain"))
        pre = fit(net, src["train"], src["val"], tcfg.pretrain, norm, seed=cfg.seed, **kw)
        source_test = accuracy(predict(net, src["test"].x, norm), src["test"].y) if ddp.is_main() else None
        zoo.replace_head(net, manifest["tasks"]["target"]["num_classes"], tcfg.arch)
        log = tracking.epoch_logger("teacher finetune", tcfg.finetune.epochs, "finetune/")
        kw = dict(device=device, on_epoch=log, checkpoints=checkpoints("teacher", "finetune"))
        fine = fit(net, tgt["train"], tgt["val"], tcfg.finetune, norm, seed=cfg.seed + 1, **kw)
    return pre, fine, source_test


def _finish(
    ctx, net, manifest, norm, tgt: dict, data_dir, out_dir, run_id, pre: FitResult, fine: FitResult, source_test
) -> dict:
    """Rank 0: checkpoint, metrics, the servable model, the teacher outputs and `info.json`."""
    cfg, tcfg = ctx.cfg, ctx.cfg.teacher
    in_ch = manifest["tasks"]["source"]["shape"][0]
    spec = checkpoint.make_spec(tcfg.arch, in_ch, manifest["tasks"]["target"]["num_classes"], tcfg.arch_kwargs)
    checkpoint.save(net, spec, out_dir)
    with timing.compute():
        metrics = {
            "pretrain_best_val_top1": pre.best_val_acc,
            "pretrain_epochs": pre.epochs,
            "pretrain_still_improving": float(pre.still_improving),
            "finetune_best_epoch": fine.best_epoch,
            "finetune_epochs": fine.epochs,
            "finetune_still_improving": float(fine.still_improving),
            "pretrain_source_test_top1": source_test,
            "val_top1": accuracy(predict(net, tgt["val"].x, norm), tgt["val"].y),
            "test_top1": accuracy(predict(net, tgt["test"].x, norm), tgt["test"].y),
            **profile(net, norm, data_dir, cfg, out_dir),
        }
    if cfg.export.onnx:  # the ONNX model, checked and timed in ONNX Runtime; evaluate times it beside each candidate
        metrics.update(export_onnx("the teacher", net, norm, data_dir, cfg, Path(out_dir) / ONNX_FILE))
    tracking.log_metrics(metrics)
    for phase, result, key in (("pretraining", pre, "pretrain"), ("fine-tuning", fine, "finetune")):
        if result.still_improving:  # said in the run log, the console and on the run
            print(
                f"{tracking.PROGRESS_PREFIX} teacher {phase} was still improving on validation when it ended "
                f"(best epoch {result.best_epoch} of {result.epochs}): raise teacher.{key}.epochs "
                f"(with teacher.{key}.patience it stops by itself)",
                flush=True,
            )
    tracking.set_tags({"kdflow.teacher_still_improving": str(pre.still_improving or fine.still_improving).lower()})
    model_uri = log_servable(net, norm, data_dir)
    onnx_uri = log_onnx(Path(out_dir) / ONNX_FILE, data_dir) if cfg.export.onnx else None
    save_teacher_outputs(cfg, net, norm, data_dir, manifest, out_dir)
    info = {
        "run_id": run_id,
        "model_uri": model_uri,
        "onnx_model_uri": onnx_uri,
        "metrics": metrics,
        "finetune_best_epoch": fine.best_epoch,
        "data_hash": manifest["content_hash"],
        "processes": ddp.world_size(),
    }
    write_info(out_dir, info)
    return metrics


# ------------------------------------------------------------------------------------- teacher_outputs.pt


def save_teacher_outputs(cfg: Config, net: nn.Module, norm: data.Normalizer, data_dir: str, manifest: dict, out_dir):
    """The teacher's logits on the distillation transfer sets, computed once here for every distill step and
    epoch, keyed by the teacher's weights and the data's content hash. With random crops: a table over every
    crop variant of the target images, when that pays (`tabulate_teacher`). Skipped when no objective uses the
    teacher's logits without its features (objectives with features run the teacher per batch under
    augmentation)."""
    dcfg = cfg.distill
    augment = dcfg.train.augment
    teacher_losses = [objectives.build(lc) for lc in dcfg.losses]
    teacher_losses = [o for o in teacher_losses if o.needs_teacher and not (augment != "none" and o.needs_features)]
    searched = dcfg.search is not None  # its variants distill logits, on source images too when its space says so
    if not teacher_losses and not searched:
        return
    net = net.to(resolve_device(cfg.device))  # profiling and model logging left it on the CPU
    x_target, _ = data.load_split(data_dir, "target", "train")
    source_used = any(o.uses_source_data for o in teacher_losses) or (
        searched and bool({"source", "both"} & set(dcfg.search.transfer))
    )
    with_source = augment == "none" and source_used
    x_source = data.load_split(data_dir, "source", "train")[0] if with_source else None
    with timing.compute():
        key = teacher_outputs_key(net, manifest["content_hash"])
        if augment == "none":
            out = compute_teacher_outputs(net, norm, key, x_target, x_source)
        else:  # each epoch visits every target image `passes` times (`epoch_over`)
            counts = manifest["tasks"]
            n, n_src = counts["target"]["counts"]["train"], counts["source"]["counts"]["train"]
            passes = -(-epoch_size(dcfg.train.epoch_over, n, n_src, source_used) // n)
            out = tabulate_teacher(net, norm, x_target, augment, dcfg.train.epochs * passes, key)
    if out is None:  # a table would cost more teacher passes than the distill epochs: they run it per batch
        return
    blob = {"key": key, "augment": augment, "target": out.target.cpu()}
    if out.source is not None:
        blob["source"] = out.source.cpu()
    torch.save(blob, Path(out_dir) / TEACHER_OUTPUTS_FILE)


def load_teacher_outputs(teacher: nn.Module, manifest: dict, teacher_dir: str) -> TeacherOutputs | None:
    """The teacher step's cached logits if they belong to exactly this teacher and data, else None (the
    distill step then runs the teacher itself). `fit_many` uses them only when it trains with the
    augmentation they were computed for."""
    path = Path(teacher_dir) / TEACHER_OUTPUTS_FILE
    if not path.is_file():
        return None
    blob = torch.load(path, weights_only=True)
    if blob["key"] != teacher_outputs_key(teacher, manifest["content_hash"]):
        print(f"{tracking.PROGRESS_PREFIX} ignoring stale {path}: it belongs to another teacher or dataset")
        return None
    return TeacherOutputs(blob["key"], blob["target"], blob.get("source"), augment=blob.get("augment", "none"))
