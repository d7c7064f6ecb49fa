"""One training loop for pretraining, fine-tuning and distillation: `fit` for one student, `fit_many` for
several over one data stream.

Datasets here are small enough to live as uint8 tensors on the training device; batches are sliced from them
and normalised (and augmented) on the device (`kdflow.engine.stream`), so no DataLoader workers or per-sample
PIL transforms sit in the hot path. A teacher, when given, is frozen in eval mode and only ever runs under
`torch.no_grad()`; where its outputs come from (computed once, a crop table, a pass per batch) is decided
before the first epoch (`kdflow.engine.teacher_outputs`). The best epoch on the validation split is kept:
test data never steers training.

Inside a torchrun worker the same loop trains data-parallel (`kdflow.engine.ddp`): each student is wrapped in
DistributedDataParallel and each rank trains on its share of every global batch.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdflow import objectives
from kdflow.config import LossConfig, TrainConfig
from kdflow.data.dataset import ImageSet, Normalizer
from kdflow.engine import ddp
from kdflow.engine.device import FeatureTap, RngSlot, autocast, prepare, seed_everything
from kdflow.engine.resume import Checkpoints, global_rng_state, set_global_rng_state
from kdflow.engine.stream import Batch, Stream, epoch_size
from kdflow.engine.teacher_outputs import TeacherOutputs, TeacherSource, TeacherView, teacher_source
from kdflow.evaluate import accuracy, predict


@dataclass
class Student:
    """One candidate for `fit_many`: a model, its objective, (hint losses) the student and teacher layers to
    match, and a per-epoch callback."""

    model: nn.Module
    loss: LossConfig = field(default_factory=lambda: LossConfig(name="ce", kind="ce"))
    hint_layers: tuple[str, str] | None = None
    on_epoch: Callable[[int, dict[str, float]], None] | None = None


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float
    history: list[dict[str, float]] = field(default_factory=list)
    epochs: int = 0  # epochs trained: `cfg.epochs`, or fewer when early stopping ended the run
    stopped_early: bool = False
    best_val_loss: float = float("inf")  # the validation loss of the best epoch (the tie-break)
    halted: bool = False  # stopped by `fit_many`'s `halt` hook (a search's rung), not by its own patience

    @property
    def still_improving(self) -> bool:
        """Validation was still improving when training ended: its best epoch is among the last
        max(1, epochs // 5) (never after an early stop). More epochs would likely have helped."""
        return not self.stopped_early and self.epochs > 0 and self.best_epoch > self.epochs - max(1, self.epochs // 5)


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """The learning-rate schedule, stepped per batch (`cfg.schedule` after `cfg.warmup_epochs` of linear warm-up):
    cosine from the configured rate to zero over the whole run, constant, or ×0.1 at 50% and 75% of it."""
    sched = torch.optim.lr_scheduler
    total, warm = max(1, cfg.epochs * steps_per_epoch), cfg.warmup_epochs * steps_per_epoch
    rest = max(1, total - warm)
    if cfg.schedule == "cosine":
        main = sched.CosineAnnealingLR(opt, T_max=rest)
    elif cfg.schedule == "step":
        main = sched.MultiStepLR(opt, milestones=[max(1, rest // 2), max(2, (3 * rest) // 4)], gamma=0.1)
    else:
        main = sched.ConstantLR(opt, factor=1.0, total_iters=0)
    if not warm:
        return main
    warmup = sched.LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm)
    return sched.SequentialLR(opt, [warmup, main], milestones=[warm])


def validate(model: nn.Module, val: ImageSet, normalizer: Normalizer) -> tuple[float, float]:
    """(accuracy, cross-entropy) on the validation split. Under DDP rank 0 computes them and every rank gets
    rank 0's numbers, so all ranks make the same best-epoch choice."""
    result = None
    if ddp.is_main():
        logits = predict(model, val.x, normalizer)
        result = (accuracy(logits, val.y), float(F.cross_entropy(logits, val.y.cpu())))
    return ddp.broadcast_object(result)


class Job:
    """What one student computes: its objective, optimizer, schedule, RNG stream and best state. The engine
    (`fit_many`) owns the devices, the data stream and the teacher; a job owns one optimizer step."""

    def __init__(self, spec: Student, objective: objectives.Objective, cfg: TrainConfig, run: _Run):
        self.spec, self.objective = spec, objective
        model, device = spec.model.to(run.device), run.device
        if run.channels_last:
            model.to(memory_format=torch.channels_last)
        self.sync_bn = ddp.use_sync_batchnorm(model) if run.world > 1 and device.type == "cuda" else []
        self.tap = self.adapter = None
        if self.objective.needs_features:
            self.tap = FeatureTap(model, spec.hint_layers[0])
            t_tap = run.taps[spec.hint_layers[1]]
            with torch.no_grad():  # one probe batch tells the adapter its channel counts
                probe = run.normalizer(run.stream.train.x[:2])
                model.eval()(probe)
                run.teacher(probe)
            self.adapter = self.objective.make_adapter(self.tap.value.shape[1], t_tap.value.shape[1]).to(device)
        self.net, self.net_adapter = model, self.adapter  # what a step calls: DDP wrappers under torch.distributed
        if run.world > 1:
            self.net = ddp.wrap(model, device)
            self.net_adapter = ddp.wrap(self.adapter, device) if self.adapter else None
        params = list(model.parameters()) + (list(self.adapter.parameters()) if self.adapter else [])
        self.opt = make_optimizer(cfg, params)
        self.sched = make_schedule(cfg, self.opt, len(run.stream))
        init_acc, init_loss = validate(model, run.val, run.normalizer)
        self.net = torch.compile(self.net) if cfg.compile else self.net
        self.scaler = autocast(device)[1]
        self.rng = RngSlot(device)
        self.result = FitResult(best_epoch=0, best_val_acc=init_acc, best_val_loss=init_loss)
        self.best_key = (init_acc, -init_loss)
        self.best_state = copy.deepcopy(model.state_dict())
        self.sums: dict[str, torch.Tensor] = {}
        self.patience, self.since_best, self.done = cfg.patience, 0, False

    def outputs(self, b: Batch, t: TeacherView) -> objectives.Outputs:
        """The student's forward pass on the batch, and the student and teacher on its transfer set."""
        n, transfer = len(b.x), self.spec.loss.transfer
        out = self.net(torch.cat([b.x, b.xs]) if b.xs is not None else b.x)  # (B or 2B, K): one pass
        view = objectives.Outputs(out[:n] if b.xs is not None else out, b.y)
        if not self.objective.needs_teacher:
            return view
        view.student = out[n:] if transfer == "source" else out
        view.teacher = {"target": t.target, "source": t.source}.get(transfer)
        if transfer == "both":
            view.teacher = torch.cat([t.target, t.source])
        if self.objective.needs_features:
            s_feat, t_feat = self.tap.value, t.features[self.spec.hint_layers[1]]  # over [target; source]
            view.student_features = s_feat[n:] if transfer == "source" else s_feat
            view.teacher_features = t_feat[n:] if transfer == "source" else t_feat
        return view

    def step(self, b: Batch, t: TeacherView, amp) -> None:
        """One optimizer step on the shared batch."""
        with amp:
            total, parts = self.objective(self.outputs(b, t), self.net_adapter)
        scaled = total if b.weight is None else total * b.weight  # DDP averages: Σ_ranks share/batch · mean
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            scaled.backward()
            self.opt.step()
        self.sched.step()
        world = ddp.world_size()
        for k, v in [*parts.items(), ("loss", total.detach())]:  # tensors: no device sync per step
            v = v if b.weight is None else v * (b.weight / world)  # DDP: this rank's part of the mean
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def end_epoch(self, epoch: int, run: _Run) -> None:
        """Epoch metrics, validation, the best state so far, and the student's callback (rank 0)."""
        model = self.spec.model
        if run.world > 1:
            self.sums = ddp.all_reduce_sums({k: float(v) for k, v in self.sums.items()}, run.device)
            ddp.broadcast_buffers(model)  # every rank validates and keeps rank 0's statistics
        metrics = {f"train_{k}": float(v) / len(run.stream) for k, v in self.sums.items()}
        metrics["val_acc"], metrics["val_loss"] = validate(model, run.val, run.normalizer)
        metrics["lr"] = self.sched.get_last_lr()[0]
        self.result.history.append(metrics)
        key = (metrics["val_acc"], -metrics["val_loss"])  # small val sets saturate: ties go to the lower loss
        self.since_best += 1
        if key > self.best_key:
            self.best_key, self.result.best_epoch, self.result.best_val_acc = key, epoch, metrics["val_acc"]
            self.result.best_val_loss = metrics["val_loss"]
            self.best_state = copy.deepcopy(model.state_dict())
            self.since_best = 0
        self.result.epochs = epoch
        if self.patience is not None and self.since_best >= self.patience:  # early stop (same on every rank)
            self.done = self.result.stopped_early = True
        if self.spec.on_epoch and ddp.is_main():
            self.spec.on_epoch(epoch, metrics)

    def state(self) -> dict:
        """What the next epoch depends on (`kdflow.engine.resume`): weights, optimizer, schedule, scaler, best
        state and early-stopping count; its RNG stream is per rank (`rng_state`)."""
        return {
            "model": self.spec.model.state_dict(),
            "adapter": self.adapter.state_dict() if self.adapter is not None else None,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best_state": self.best_state,
            "best_key": list(self.best_key),
            "since_best": self.since_best,
            "done": self.done,
            "result": dataclasses.asdict(self.result),
        }

    def rng_state(self) -> list[torch.Tensor | None]:
        return [self.rng.cpu, self.rng.cuda]

    def load_state(self, state: dict, rng: list[torch.Tensor | None]) -> None:
        """Continue from `state()` and `rng_state()` of an earlier process (a checkpoint)."""
        self.spec.model.load_state_dict(state["model"])
        if self.adapter is not None:
            self.adapter.load_state_dict(state["adapter"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.rng.cpu, cuda = rng
        self.rng.cuda = cuda if self.rng.cuda is not None else None
        self.best_state, self.best_key = state["best_state"], tuple(state["best_key"])
        self.since_best, self.done = state["since_best"], state["done"]
        self.result = FitResult(**state["result"])

    def finish(self, channels_last: bool) -> FitResult:
        """Leave the model holding its best-validation weights, in the plain layout."""
        if self.tap:
            self.tap.close()
        if hasattr(self.spec.on_epoch, "close") and ddp.is_main():  # a logger's last buffered epochs
            self.spec.on_epoch.close()
        self.spec.model.load_state_dict(self.best_state)
        if channels_last:
            self.spec.model.to(memory_format=torch.contiguous_format)
        ddp.restore_batchnorm(self.sync_bn)
        return self.result


@dataclass
class _Run:
    """What the engine sets up once for all of a run's students."""

    device: torch.device
    world: int
    channels_last: bool
    normalizer: Normalizer
    stream: Stream
    val: ImageSet
    teacher: nn.Module | None
    taps: dict[str, FeatureTap]


def fit(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet,
    cfg: TrainConfig,
    normalizer: Normalizer,
    *,
    seed: int,
    device: torch.device,
    loss: LossConfig | None = None,
    teacher: nn.Module | None = None,
    source: ImageSet | None = None,
    hint_layers: tuple[str, str] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    teacher_outputs: TeacherOutputs | None = None,
    checkpoints: Checkpoints | None = None,
) -> FitResult:
    """Train `model` in place and leave it holding its best-validation weights (accuracy, then lower loss).

    `loss` defaults to plain cross-entropy. With a teacher, the distillation terms use the transfer set that
    `loss.transfer` names: the target batch itself, a batch of `source` images, or both concatenated.
    `hint_layers` = (student layer, teacher layer) for feature-hint objectives. One student of `fit_many`.
    """
    student = Student(model, loss or LossConfig(name="ce", kind="ce"), hint_layers, on_epoch)
    kwargs = dict(seed=seed, device=device, teacher=teacher, source=source, teacher_outputs=teacher_outputs)
    kwargs["checkpoints"] = checkpoints
    return fit_many([student], train, val, cfg, normalizer, **kwargs)[0]


def fit_many(
    students: list[Student],
    train: ImageSet,
    val: ImageSet,
    cfg: TrainConfig,
    normalizer: Normalizer,
    *,
    seed: int,
    device: torch.device,
    teacher: nn.Module | None = None,
    source: ImageSet | None = None,
    teacher_outputs: TeacherOutputs | None = None,
    halt: Callable[[int, dict[int, tuple[float, float]]], set[int]] | None = None,
    checkpoints: Checkpoints | None = None,
) -> list[FitResult]:
    """Train several students over one data stream, sharing each batch's teacher pass; every student ends
    holding its best-validation weights. Each student gets exactly the batches, augmentation, initial RNG state
    and optimizer it would get from `fit` alone with the same seed, so the results equal training them one by
    one. The students must agree on whether their transfer set includes source images (one stream).

    The teacher's outputs come from one source chosen before the first epoch (`teacher_source`): computed once
    (or taken from `teacher_outputs`) without random augmentation, a crop table with it, or a teacher pass per
    batch when hint features or the table do not fit.

    Under torch.distributed with several processes, each student (and hint adapter) trains in
    DistributedDataParallel: every rank draws the same global batch of `cfg.batch_size` and trains on
    `batch[rank::world]`, its loss weighted so the averaged gradient is the global batch's, so one optimizer
    step still consumes one global batch. BatchNorm uses SyncBatchNorm on CUDA (torch has no CPU kernel for it;
    on CPU each rank normalises its share and rank 0's running statistics are kept). Rank 0 validates and its
    numbers reach every rank, so all ranks keep the same epoch and end with identical weights; only rank 0 calls
    `on_epoch`. The teacher is never wrapped: it is frozen and each rank runs it forward on its own share.

    `cfg.epoch_over` sets an epoch's length (`epoch_size`); `source` given to students that do not use source
    images only lends its size there ("source").

    `halt(epoch, standing)`, when given, is called after each epoch with every student still training (its
    index → its best (val accuracy, −val loss) so far) and returns the indices to stop there (`FitResult.halted`):
    a search's successive halving (`kdflow.search.Halving`). Its inputs are rank 0's, so every rank agrees.

    `checkpoints`, when given, continues from the latest checkpoint of an earlier, interrupted process with the
    same arguments, and writes one at epoch ends when due and when training ends (`kdflow.engine.resume`): the
    results and weights equal an uninterrupted run's. Under DDP rank 0 alone writes them.
    """
    objs = [objectives.build(s.loss) for s in students]
    use_source = _check(students, objs, teacher, source, teacher_outputs)
    size = epoch_size(cfg.epoch_over, len(train), len(source) if source is not None else None, use_source)
    run = _setup(
        objs, students, train, val, cfg, normalizer, seed, device, teacher, source if use_source else None, size
    )
    outputs = TeacherSource()  # where every batch's teacher outputs come from, decided once: none without KD
    if any(obj.needs_teacher for obj in objs):
        source_x = run.stream.source.x if use_source else None
        outputs = teacher_source(
            teacher, run.taps, run.normalizer, run.stream.train.x, source_x, cfg.augment, teacher_outputs
        )
    jobs = []
    for s, obj in zip(students, objs):
        seed_everything(seed)  # the state `fit` alone would start this student from
        jobs.append(Job(s, obj, cfg, run))

    amp, _ = autocast(run.device)
    gen = torch.Generator(device=run.device).manual_seed(seed)
    start = _resume(checkpoints, jobs, gen, run.device)
    for epoch in range(start + 1, cfg.epochs + 1):
        active = [job for job in jobs if not job.done]  # early stopping ends each student's run on its own
        if not active:
            break
        for job in active:
            job.net.train()
            job.sums = {}
        for batch in run.stream.epoch(gen):
            t = outputs(batch)  # the teacher on the batch: one lookup or pass for all students
            for job in active:
                with job.rng.active():
                    job.step(batch, t, amp)
        for job in active:
            job.end_epoch(epoch, run)
        if halt is not None:
            standing = {i: job.best_key for i, job in enumerate(jobs) if not job.done}
            for i in halt(epoch, standing):
                jobs[i].done = jobs[i].result.halted = True
        if checkpoints is not None and epoch < cfg.epochs and _due(checkpoints):
            _checkpoint(checkpoints, jobs, gen, epoch, run.device)
    if checkpoints is not None and checkpoints.resumed_from != cfg.epochs:
        _checkpoint(checkpoints, jobs, gen, cfg.epochs, run.device)  # the end: a finished fit is not trained again
    for tap in run.taps.values():
        tap.close()
    return [job.finish(run.channels_last) for job in jobs]


def _resume(checkpoints: Checkpoints | None, jobs: list[Job], gen: torch.Generator, device: torch.device) -> int:
    """Load the latest checkpoint into the jobs, the stream's generator and the global RNG; the epoch it ended.
    Under DDP rank 0 reads it and sends it to every rank, which takes its own RNG states from it."""
    if checkpoints is None:
        return 0
    state = ddp.broadcast_object(checkpoints.load() if ddp.is_main() else None)
    if state is None:
        return 0
    if len(state["jobs"]) != len(jobs):
        raise ValueError(f"checkpoint {checkpoints.key!r} holds {len(state['jobs'])} students, not {len(jobs)}")
    mine = _rank_rng(state, ddp.rank(), ddp.world_size(), checkpoints.key)
    for job, saved, rng in zip(jobs, state["jobs"], mine["jobs"]):
        job.load_state(saved, rng)
    gen.set_state(state["gen"].to(gen.get_state().device))
    set_global_rng_state(mine["global"], device)
    checkpoints.resumed_from = int(state["epoch"])  # on every rank: all take part in the last checkpoint or none
    if ddp.is_main():
        print(f"[kdflow] {checkpoints.key}: resumed after epoch {state['epoch']} from its checkpoint", flush=True)
    return int(state["epoch"])


def _rank_rng(state: dict, rank: int, world: int, key: str) -> dict:
    """This rank's RNG states in a checkpoint: its global RNG and each student's stream. Ranks draw differently
    (dropout over shares of unequal size), so each rank's are kept. A group of another size (a retried pod on a
    node with fewer GPUs) continues with rank 0's: the same global batches, no longer the same random draws."""
    ranks = state["ranks"]
    if len(ranks) == world:
        return ranks[rank]
    if rank == 0:
        print(f"[kdflow] {key}: written by {len(ranks)} processes, resumed by {world}: training continues, but its "
              "random draws differ from an uninterrupted run's", flush=True)  # fmt: skip
    return ranks[0]


def _due(checkpoints: Checkpoints) -> bool:
    """Whether a checkpoint is due now: rank 0's clock decides for every rank."""
    return ddp.broadcast_object(checkpoints.due())


def _checkpoint(checkpoints: Checkpoints, jobs: list[Job], gen: torch.Generator, epoch: int, device) -> None:
    """Write the state after `epoch`: every rank's RNG states gathered to rank 0, which writes; the loggers flush
    first, so MLflow holds every epoch it covers."""
    ranks = ddp.gather_object({"global": global_rng_state(device), "jobs": [j.rng_state() for j in jobs]})
    if not ddp.is_main():
        return
    for job in jobs:
        if hasattr(job.spec.on_epoch, "flush"):
            job.spec.on_epoch.flush()
    state = {"epoch": epoch, "gen": gen.get_state(), "ranks": ranks}
    checkpoints.save({**state, "jobs": [job.state() for job in jobs]})


def _check(
    students: list[Student],
    objs: list[objectives.Objective],
    teacher: nn.Module | None,
    source: ImageSet | None,
    given: TeacherOutputs | None,
) -> bool:
    """Refuse what cannot train; return whether the stream carries source images."""
    if not students:
        raise ValueError("fit_many needs at least one student")
    if isinstance(teacher, nn.parallel.DistributedDataParallel):
        raise ValueError("the teacher is frozen and only runs forward: pass the bare module, not a DDP wrapper")
    for s, obj in zip(students, objs):
        if obj.needs_teacher and teacher is None and given is None:
            raise ValueError(f"loss {s.loss.name!r} ({s.loss.kind}) needs a teacher")
        if obj.needs_features and (s.hint_layers is None or teacher is None):
            raise ValueError(
                f"loss {s.loss.name!r} ({s.loss.kind}) needs a teacher and hint_layers=(student, teacher layer)"
            )
    streams = {obj.uses_source_data for obj in objs}
    if len(streams) > 1:
        raise ValueError("students trained together must agree on using source data; train the groups apart")
    use_source = streams.pop()
    if use_source and source is None:
        names = [s.loss.name for s in students]
        raise ValueError(f"losses {names} use source images in their transfer set but no source data was given")
    return use_source


def _setup(objs, students, train, val, cfg, normalizer, seed, device, teacher, source, size) -> _Run:
    """Devices, seeding, the data on the device, the frozen teacher and its hint-layer taps."""
    prepare(device)
    world = ddp.world_size()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    channels_last = device.type == "cuda" and train.x.dim() == 4  # the students' memory format: see `nhwc`
    seed_everything(seed)
    normalizer = normalizer.to(device)
    train, val = train.to(device), val.to(device)
    source = source.to(device) if source is not None else None
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if train.x.dim() == 4:
            teacher.to(memory_format=torch.channels_last)  # on every device: see `nhwc`
    layers = sorted({s.hint_layers[1] for s, obj in zip(students, objs) if obj.needs_features})
    taps = {layer: FeatureTap(teacher, layer) for layer in layers}
    stream = Stream(train, source, normalizer, cfg.batch_size, cfg.augment, channels_last, size)
    return _Run(device, world, channels_last, normalizer, stream, val, teacher, taps)
