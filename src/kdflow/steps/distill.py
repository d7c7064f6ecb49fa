"""Step 4, distillation: train candidates (a student × a loss each) on the target task with the teacher."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from kdflow import data, objectives, search, tracking
from kdflow.config import Candidate, LossConfig
from kdflow.data import ImageSet
from kdflow.engine.device import resolve_device, seed_everything
from kdflow.engine.loop import FitResult, Student, fit_many
from kdflow.engine.teacher_outputs import TeacherOutputs
from kdflow.models import checkpoint, zoo
from kdflow.runtime import cpus, timing
from kdflow.steps.context import (
    StepContext,
    log_servable,
    pruned_dir,
    read_info,
    seed_dir,
    splits,
    write_group,
    write_info,
)
from kdflow.steps.teacher import load_teacher_outputs


@dataclass
class _Trainee:
    """One candidate of the step: what `fit_many` trains, its checkpoint spec, lineage tags and MLflow run."""

    student: Student
    spec: dict
    lineage: dict[str, str]
    run_id: str
    search: list[dict] | None = None  # a search candidate's variants (`kdflow.search.record`), once trained
    chosen: LossConfig | None = None  # ... and the loss it chose


def distill(
    ctx: StepContext, names: list[str], data_dir: str, teacher_dir: str, pruned_root: str, out_dir: str
) -> dict[str, dict]:
    """Train candidates on the target task with the teacher's soft targets; returns each one's best
    validation accuracy and epoch.

    The candidates of one step train side by side over one data stream (`fit_many`): each batch's teacher
    outputs serve all of them, and they come from `teacher_outputs.pt`, which the teacher step computed once
    (without random augmentation, or as a table over every crop variant when that pays). Each candidate gets
    its own MLflow run and its own folder `out_dir/<name>`."""
    cpus.share_cores()
    cfg = ctx.cfg
    if not names:
        raise ValueError("distill got no candidates")
    cands = [cfg.candidate(n) for n in names]
    manifest = data.read_manifest(data_dir)
    teacher, tspec = checkpoint.load(teacher_dir)
    teacher_info = read_info(teacher_dir)
    write_group(out_dir, names)
    trainees: dict[str, _Trainee] = {}
    first, *more = cfg.seeds
    try:
        for c in cands:
            trainees[c.name] = _open(ctx, c, manifest, pruned_root, tspec["arch"], teacher_info["run_id"], names)
        cached = load_teacher_outputs(teacher, manifest, teacher_dir)
        results = _train(ctx, cands, trainees, data_dir, manifest, teacher, cached, first)
        seeded = {}  # seed -> candidate -> (its model, its result): the further seeds, same settings
        for seed in more:
            again = [_chosen(c, trainees[c.name]) for c in cands]
            twins = {c.name: _twin(ctx, c, trainees[c.name], manifest, pruned_root, seed) for c in again}
            fitted = _train(ctx, again, twins, data_dir, manifest, teacher, cached, seed)
            seeded[seed] = {n: (twins[n].student.model, fitted[n]) for n in names}
        norm = data.Normalizer.from_manifest(manifest)
        for c in cands:
            cdir = Path(out_dir) / c.name
            _save(trainees[c.name], results[c.name], c.name, norm, data_dir, cdir, cfg.seeds)
            for seed in more:
                _save_seed(trainees[c.name], *seeded[seed][c.name], seed, cdir)
    except BaseException:
        for t in trainees.values():
            tracking.end_run(t.run_id, "FAILED")
        tracking.end_run(ctx.parent_id, "FAILED")
        raise
    return {n: {"best_val_top1": results[n].best_val_acc, "best_epoch": results[n].best_epoch} for n in names}


def _open(
    ctx: StepContext, c: Candidate, manifest: dict, pruned_root: str, teacher_arch: str, teacher_run: str, group
) -> _Trainee:
    """The candidate's student network (a pruned teacher or a fresh architecture) and its RUNNING MLflow run,
    with its lineage as tags and its settings as params."""
    s, loss = c.student, c.loss
    model, spec = _network(c, manifest, pruned_root, ctx.cfg.seeds[0])
    lineage = {
        "kdflow.candidate": c.name,
        "kdflow.student": s.name,
        "kdflow.student_arch": spec["arch"],
        "kdflow.prune_ratio": str(s.from_pruned) if s.from_pruned is not None else "none",
        "kdflow.init": s.init,
        "kdflow.loss": loss.kind,
        "kdflow.loss_name": loss.name,
        **(objectives.setting_tags(loss) if c.search is None else {}),  # a search's: once it chose (`_search`)
        "kdflow.teacher_run_id": teacher_run,
        "kdflow.data_hash": manifest["content_hash"],
        "kdflow.trained_with": ",".join(group),
        tracking.PIPELINE_RUN_TAG: ctx.pipeline_run_id,
    }
    if c.search is not None:  # its loss is the search's to choose: `_search` sets these tags to the choice
        lineage.update({"kdflow.search": c.search.name, "kdflow.loss": search.SEARCHING})
    run_id = tracking.open_child_run(ctx.experiment_id, ctx.parent_id, c.name, "distill", lineage)
    chosen_by = c.search.model_dump() if c.search is not None else None  # a search logs its space, not a loss
    tracking.log_params(  # into the run, which stays RUNNING until its model is logged
        {
            **{f"student.{k}": v for k, v in s.model_dump().items()},
            **({"loss.name": loss.name, "loss.kind": loss.kind} if chosen_by is None else {}),
            **{f"loss.{k}": v for k, v in objectives.used_settings(loss).items() if chosen_by is None},
            **{f"search.{k}": v for k, v in (chosen_by or {}).items()},
            **{f"train.{k}": v for k, v in ctx.cfg.distill.train.model_dump().items()},
        },
        run_id=run_id,
    )
    logger = tracking.epoch_logger(f"distill {c.name}", ctx.cfg.distill.train.epochs, "epoch/", run_id)
    student = Student(model, loss, (zoo.hint_layer(spec["arch"]), zoo.hint_layer(teacher_arch)), logger)
    return _Trainee(student, spec, lineage, run_id)


def _network(c: Candidate, manifest: dict, pruned_root: str, seed: int):
    """The candidate's untrained student and its checkpoint spec: the pruned teacher (or its architecture from
    weights drawn under `seed`), or a registry architecture initialised under `seed`."""
    s = c.student
    seed_everything(seed)
    if s.from_pruned is not None:
        model, spec = checkpoint.load(pruned_dir(pruned_root, s.from_pruned))
        if s.reinit:  # the pruned architecture from random weights: the from-scratch baseline
            zoo.reinitialize(model)
        return model, spec
    t = manifest["tasks"]["target"]
    model = zoo.build(s.arch, t["shape"][0], t["num_classes"], **s.arch_kwargs)
    return model, checkpoint.make_spec(s.arch, t["shape"][0], t["num_classes"], s.arch_kwargs)


def _chosen(c: Candidate, t: _Trainee) -> Candidate:
    """What the further seeds train: the candidate itself, or for a search its chosen loss (under its name)."""
    if c.search is None:
        return c
    return Candidate(student=c.student, loss=t.chosen.model_copy(update={"name": c.loss.name}))


def _twin(ctx: StepContext, c: Candidate, t: _Trainee, manifest: dict, pruned_root: str, seed: int) -> _Trainee:
    """The candidate under another training seed: a fresh network, logging into the same run (`seed<k>.`)."""
    model, _ = _network(c, manifest, pruned_root, seed)
    epochs = ctx.cfg.distill.train.epochs
    logger = tracking.epoch_logger(f"distill {c.name} seed {seed}", epochs, f"seed{seed}/", t.run_id)
    return _Trainee(Student(model, c.loss, t.student.hint_layers, logger), t.spec, t.lineage, t.run_id)


def _train(
    ctx: StepContext,
    cands: list[Candidate],
    trainees: dict[str, _Trainee],
    data_dir: str,
    manifest: dict,
    teacher,
    cached: TeacherOutputs | None,
    seed: int,
) -> dict[str, FitResult]:
    """`fit_many` once per kind of data stream: candidates whose transfer sets use source images apart."""
    fixed = [c for c in cands if c.search is None]
    objs = {c.name: objectives.build(c.loss) for c in fixed}
    tgt = splits(data_dir, "target")
    source: ImageSet | None = None
    needs = any(o.uses_source_data for o in objs.values()) or any(c.search for c in cands)
    if needs or ctx.cfg.distill.train.epoch_over == "source":  # ("source": its size sets every epoch's length)
        source = data.load_imageset(data_dir, "source", "train")

    def train(students: list[Student], key: str, **kw) -> list[FitResult]:
        """One `fit_many`, its epoch checkpoints under `key` (so an interrupted step continues there)."""
        ckpt = ctx.checkpoints("distill", f"seed{seed}-{key}", ",".join(c.name for c in cands))
        with timing.compute():
            return fit_many(
                students,
                tgt["train"],
                tgt["val"],
                ctx.cfg.distill.train,
                data.Normalizer.from_manifest(manifest),
                seed=seed,
                device=resolve_device(ctx.cfg.device),
                teacher=teacher if any(objectives.build(s.loss).needs_teacher for s in students) else None,
                source=source,  # a target-only group reads only its size (`epoch_over`)
                teacher_outputs=cached,
                checkpoints=ckpt,
                **kw,
            )

    results = {}
    for stream in (False, True):
        group = [c.name for c in fixed if objs[c.name].uses_source_data == stream]
        if group:
            results.update(zip(group, train([trainees[n].student for n in group], _STREAMS[stream])))
    for c in cands:
        if c.search is not None:
            results[c.name] = _search(ctx, c, trainees[c.name], train, seed)
    return results


_STREAMS = {False: "target", True: "source"}  # a fit_many's stream: with source images in its batches or not


def _search(ctx: StepContext, c: Candidate, t: _Trainee, train, seed: int) -> FitResult:
    """A search candidate: sample its variants, train them by successive halving (one `fit_many` per data
    stream), log each variant's curve and settings into the candidate's run, and leave the candidate's model
    holding the chosen variant's weights; its lineage tags then name the chosen loss."""
    epochs = ctx.cfg.distill.train.epochs
    study, variants = search.sample(c.search, seed, has_source=True)
    models, fitted = {}, {}
    for stream in (False, True):
        group = [v for v in variants if objectives.build(v.loss).uses_source_data == stream]
        if not group:
            continue
        students = []
        for v in group:
            models[v.loss.name] = model = copy.deepcopy(t.student.model)  # every variant from the same weights
            log = tracking.epoch_logger(f"search {c.name}/{v.loss.name}", epochs, f"search/{v.loss.name}/", t.run_id)
            students.append(Student(model, v.loss, t.student.hint_layers, log))
        halving = search.Halving(c.search, epochs, group)
        for v, result in zip(group, train(students, f"search-{c.name}-{_STREAMS[stream]}", halt=halving)):
            v.curve = [h["val_acc"] for h in result.history]
            v.halted_at = result.epochs if result.halted else None  # (also after a resume past its rung)
            v.best_key = (result.best_val_acc, -result.best_val_loss)
            v.best_val_acc = result.best_val_acc
            fitted[v.loss.name] = result
    chosen = search.finish(study, variants)
    t.student.model.load_state_dict(models[chosen.loss.name].state_dict())
    t.search, t.chosen = search.record(variants, chosen), chosen.loss
    t.lineage.update(search.lineage(chosen.loss))
    with tracking.reopen(t.run_id):
        tracking.set_tags(search.lineage(chosen.loss))
        tracking.log_params({f"search.chosen.{k}": v for k, v in chosen.settings().items()})
        tracking.log_dict({"variants": t.search, "space": c.search.model_dump(mode="json")}, "search.json")
    return fitted[chosen.loss.name]


def _save(
    t: _Trainee, result: FitResult, name: str, norm: data.Normalizer, data_dir: str, cdir: Path, seeds: list[int]
) -> None:
    """The trained student's checkpoint, best-epoch metrics, servable model and `info.json` (the first seed's:
    the model registered)."""
    checkpoint.save(t.student.model, t.spec, cdir)
    with tracking.reopen(t.run_id):
        tracking.log_metrics({"best_epoch": result.best_epoch})  # its val_top1: the evaluate step's
        model_uri = log_servable(t.student.model, norm, data_dir)
    info = {
        "name": name,
        "run_id": t.run_id,
        "model_uri": model_uri,
        "tags": t.lineage,
        "best_epoch": result.best_epoch,
    }
    if t.search is not None:
        info["search"] = t.search
    if len(seeds) > 1:
        info["seeds"] = seeds
    write_info(cdir, info)


def _save_seed(t: _Trainee, model, result: FitResult, seed: int, cdir: Path) -> None:
    """A further seed's weights-only checkpoint (never registered: evaluation scores it) and its best epoch."""
    checkpoint.save(model, t.spec, seed_dir(cdir, seed))
    with tracking.reopen(t.run_id):
        tracking.log_metrics({f"seed{seed}.best_epoch": result.best_epoch})
