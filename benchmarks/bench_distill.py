"""Benchmark 1 of issue 4: distillation throughput, wall time, test accuracy and peak memory.

The sides train the same student (same initial weights per seed) against the same teacher on MNIST -> USPS with
the same recipe: kdflow's distillation, a plain hand-written PyTorch KD loop, and torchdistill's KD. kdflow runs
twice: "kdflow" is one self-contained `fit` call that computes whatever teacher outputs it caches inside the timed
call; "kdflow-step" is the pipeline's distill step, handed the teacher outputs the teacher step computes once per
pipeline run for every distill step (their one-time cost is timed apart, as `teacher_outputs_s`). Each
(side, seed) runs in its own fresh Python process; the side order rotates from seed to seed so a noisy machine
does not always hit the same side. Prints a markdown table (mean ± std over seeds) and writes
benchmarks/results/distill.json.

    python benchmarks/bench_distill.py                 # the config's recipe (25 epochs), seeds 0,1,2
    python benchmarks/bench_distill.py --quick         # 2 epochs, seed 0, a 3-epoch teacher: a smoke run
    python benchmarks/bench_distill.py --epochs 10 --seeds 0,1,2,3,4 --device cuda

Throughput = training images processed (epochs × train-split size) / wall time of the training call. The wall
time covers everything the side does to train: building loaders, moving data to the device, every step, the
per-epoch validation and keeping the best weights. It excludes process start-up, loading the data and teacher,
and the final test evaluation (done identically for every side by benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import (
    DEFAULT_CONFIG,
    QUICK_EPOCHS,
    REPO,
    RESULTS,
    MemoryMeter,
    Recipe,
    Stopwatch,
    Task,
    build_student,
    busy_warning,
    default_recipe,
    default_threads,
    display_path,
    fmt,
    load_cfg,
    load_teacher,
    machine_info,
    markdown_table,
    mean_std,
    open_task,
    prepare_task,
    read_teacher,
    run_measured,
    set_threads,
    test_accuracy,
    warm_up,
    write_json,
)
from torch import nn

from kdflow.engine.device import resolve_device
from kdflow.engine.loop import fit
from kdflow.engine.teacher_outputs import TeacherOutputs, compute_teacher_outputs, tabulate_teacher

SIDES = ("kdflow", "kdflow-step", "plain", "torchdistill")
KDFLOW_SIDES = ("kdflow", "kdflow-step")
SUMMARY_KEYS = ("images_per_s", "wall_s", "cpu_s", "test_acc", "peak_rss_mb", "train_rss_delta_mb", "cuda_peak_mb")
TARGETS = {"vs_plain": 2.5, "vs_torchdistill": 2.0, "accuracy_points": 0.3}  # issue 4's acceptance bar


def kdflow_distill(
    student: nn.Module,
    teacher: nn.Module,
    task: Task,
    recipe: Recipe,
    *,
    seed: int,
    device,
    teacher_outputs: TeacherOutputs | None = None,
) -> None:
    """The kdflow sides: one call to kdflow's distillation. Swap the optimised API in here; the harness around it
    (data, teacher, student, timing, memory, test accuracy) stays the same."""
    fit(
        student,
        task.train,
        task.val,
        recipe.train_config(),
        task.normalizer,
        seed=seed,
        device=device,
        loss=recipe.loss_config(),
        teacher=teacher,
        teacher_outputs=teacher_outputs,
    )


def teacher_step_outputs(teacher: nn.Module, task: Task, recipe: Recipe, device) -> TeacherOutputs | None:
    """What the pipeline's teacher step hands every distill step (`kdflow.steps.teacher.save_teacher_outputs`): the
    teacher's logits on the train split, or with random crops a table over every crop, when that pays."""
    teacher.to(device).eval()
    if recipe.augment == "none":
        return compute_teacher_outputs(teacher, task.normalizer, "", task.train.x)
    return tabulate_teacher(teacher, task.normalizer, task.train.x, recipe.augment, recipe.epochs)


def train_side(
    side: str,
    student: nn.Module,
    teacher: nn.Module,
    task: Task,
    recipe: Recipe,
    seed: int,
    device,
    workers: int,
    teacher_outputs: TeacherOutputs | None = None,
) -> None:
    if side in KDFLOW_SIDES:
        return kdflow_distill(student, teacher, task, recipe, seed=seed, device=device, teacher_outputs=teacher_outputs)
    from baselines import plain_kd, torchdistill_kd

    fn = {"plain": plain_kd, "torchdistill": torchdistill_kd}[side]
    return fn(student, teacher, task, recipe, seed=seed, device=device, workers=workers)


def worker(spec: dict) -> dict:
    """One (side, seed) run inside a fresh process."""
    set_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA context start-up is not part of any side's time
    task = open_task(load_cfg(spec["config"]), spec["data_dir"])
    teacher, _ = read_teacher(spec["teacher_file"], task)
    recipe = Recipe.from_json(spec["recipe"])
    if spec["side"] != "kdflow":
        import baselines  # noqa: F401  (imports, torchvision transforms, torchdistill: outside the timed part)

        if spec["side"] == "torchdistill":
            import torchdistill.core.distillation  # noqa: F401
    student = build_student(task, recipe, spec["seed"])
    warm_up(device)
    outputs, step_s = None, {}
    if spec["side"] == "kdflow-step":  # the teacher step's share, done once per pipeline run: timed apart
        with Stopwatch(device) as prep:
            outputs = teacher_step_outputs(teacher, task, recipe, device)
        step_s = {"teacher_outputs_s": prep.wall_s, "teacher_outputs": outputs is not None}
    meter = MemoryMeter(device)
    meter.start()
    with Stopwatch(device) as clock:
        train_side(spec["side"], student, teacher, task, recipe, spec["seed"], device, spec["workers"], outputs)
    mem = meter.stop()
    images = recipe.epochs * len(task.train)
    return {
        "side": spec["side"],
        "seed": spec["seed"],
        **step_s,
        **clock.as_dict(),
        "images": images,
        "images_per_s": images / clock.wall_s,
        "test_acc": test_accuracy(student.cpu(), task.test, task.normalizer),
        "val_acc": test_accuracy(student, task.val, task.normalizer),
        **mem,
    }


def summarise(runs: list[dict], sides: list[str]) -> dict:
    out = {}
    for side in sides:
        rs = [r for r in runs if r["side"] == side]
        out[side] = {
            k: dict(zip(("mean", "std"), mean_std([r[k] for r in rs])), n=len(rs))
            for k in (
                "images_per_s",
                "wall_s",
                "cpu_s",
                "test_acc",
                "peak_rss_mb",
                "train_rss_delta_mb",
                "cuda_peak_mb",
                "teacher_outputs_s",
            )
            if rs and all(k in r for r in rs)
        }
    summary = {"sides": out}
    for side in KDFLOW_SIDES:
        if side not in out:
            continue
        cmp, k = {}, out[side]
        for base in ("plain", "torchdistill"):
            if base in out:
                speedup = k["images_per_s"]["mean"] / out[base]["images_per_s"]["mean"]
                gap = 100 * (k["test_acc"]["mean"] - out[base]["test_acc"]["mean"])
                cmp[f"vs_{base}"] = {
                    "speedup": speedup,
                    "speedup_target": TARGETS[f"vs_{base}"],
                    "speedup_met": speedup >= TARGETS[f"vs_{base}"],
                    "accuracy_gap_points": gap,
                    "accuracy_met": abs(gap) <= TARGETS["accuracy_points"],
                }
        summary[f"{side.replace('-', '_')}_vs"] = cmp
    return summary


def table(runs: list[dict], sides: list[str], summary: dict, device: torch.device) -> str:
    plain_ips = summary["sides"].get("plain", {}).get("images_per_s", {}).get("mean")
    mem_key = "cuda_peak_mb" if device.type == "cuda" else "peak_rss_mb"
    mem_name = "peak CUDA MB" if device.type == "cuda" else "peak RSS MB"
    rows = []
    for side in sides:
        rs = [r for r in runs if r["side"] == side]
        ips = [r["images_per_s"] for r in rs]
        rel = f"{mean_std(ips)[0] / plain_ips:.2f}×" if plain_ips else "-"
        rows.append(
            [
                side,
                fmt(ips, 0),
                fmt([r["wall_s"] for r in rs], 2),
                fmt([r["cpu_s"] for r in rs], 1),
                fmt([r["test_acc"] for r in rs], 2, 100),
                fmt([r[mem_key] for r in rs], 0),
                fmt([r["train_rss_delta_mb"] for r in rs], 0),
                fmt([r["teacher_outputs_s"] for r in rs], 2) if rs and "teacher_outputs_s" in rs[0] else "-",
                rel,
            ]
        )
    header = [
        "side",
        "images/s",
        "wall s",
        "CPU s",
        "test acc %",
        mem_name,
        "train Δ RSS MB",
        "teacher step s",
        "vs plain",
    ]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="kdflow config giving data, teacher and recipe")
    p.add_argument("--epochs", type=int, help="distillation epochs (default: the config's distill.train.epochs)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs, one seed, a 3-epoch teacher")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads on every side")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the plain and torchdistill sides")
    p.add_argument("--augment", choices=["none", "crop", "crop_flip"], help="override the config's augmentation")
    p.add_argument(
        "--retries", type=int, default=2, help="rerun a run disturbed by other processes up to N times (timing only)"
    )
    p.add_argument("--out", default=str(RESULTS / "distill.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(json.loads(args.worker))))
        return 0

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        p.error(f"unknown side(s) {bad}; choose from {', '.join(SIDES)}")
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    if "torchdistill" in sides:
        try:
            import torchdistill  # noqa: F401
        except ImportError:
            p.error("the torchdistill side needs torchdistill: pip install -e '.[bench]' (or pass --sides)")
    set_threads(args.threads)
    device = resolve_device(args.device)
    cfg = load_cfg(args.config)
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else None)
    recipe = default_recipe(cfg, epochs=epochs, augment=args.augment)

    print(f"preparing data and teacher (cached in benchmarks/.cache) on {device} ...", file=sys.stderr)
    task = prepare_task(cfg)
    _, teacher_info = load_teacher(task, quick=args.quick, device=device)
    print(
        f"distill bench: {len(task.train)} train / {len(task.val)} val / {len(task.test)} test images, "
        f"teacher test acc {100 * teacher_info['test_acc']:.2f}%, {recipe.epochs} epochs, seeds {seeds}, "
        f"device {device}, torch threads {args.threads} on every side, DataLoader workers {args.workers}",
        file=sys.stderr,
    )

    runs = []
    for i, seed in enumerate(seeds):
        order = sides[i % len(sides) :] + sides[: i % len(sides)]  # rotate so no side always runs first
        for side in order:
            spec = {
                "side": side,
                "seed": seed,
                "config": str(args.config),
                "data_dir": str(task.data_dir),
                "teacher_file": str(REPO / teacher_info["file"]),
                "recipe": recipe.to_json(),
                "device": str(device),
                "threads": args.threads,
                "workers": args.workers,
            }
            r = run_measured(Path(__file__), spec, args.retries)
            runs.append(r)
            print(
                f"  {side:<12} seed {seed}: {r['images_per_s']:8.0f} img/s  {r['wall_s']:7.2f} s  "
                f"test {100 * r['test_acc']:.2f}%  peak RSS {r['peak_rss_mb']:.0f} MB  "
                f"(other processes: {r['other_cores'] or 0:.1f} cores)",
                file=sys.stderr,
            )

    summary = summarise(runs, sides)
    md = table(runs, sides, summary, device)
    print(
        f"\nDistillation, MNIST -> USPS, student {recipe.student_arch}{dict(recipe.student_kwargs)}, "
        f"{recipe.epochs} epochs × {len(task.train)} images, batch {recipe.batch_size}, {len(seeds)} seed(s), "
        f"{device}, {args.threads} torch threads\n"
    )
    print(md)
    for side in KDFLOW_SIDES:
        for name, c in summary.get(f"{side.replace('-', '_')}_vs", {}).items():
            print(
                f"\n{side} {name.replace('_', ' ')}: {c['speedup']:.2f}× images/s (target ≥ {c['speedup_target']}×: "
                f"{'met' if c['speedup_met'] else 'not met'}), test accuracy {c['accuracy_gap_points']:+.2f} points "
                f"(target within ±{TARGETS['accuracy_points']}: {'met' if c['accuracy_met'] else 'not met'})",
                end="",
            )
    print()
    warning = busy_warning(runs, lambda r: f"{r['side']} seed {r['seed']}")
    if warning:
        print(f"\n{warning}")
    write_json(
        Path(args.out),
        {
            "benchmark": "distill",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(device, args.threads),
            "dataloader_workers": args.workers,
            "config": display_path(args.config),
            "recipe": recipe.to_json(),
            "data": {"train": len(task.train), "val": len(task.val), "test": len(task.test)},
            "teacher": teacher_info,
            "seeds": seeds,
            "quick": args.quick,
            "targets": TARGETS,
            "summary": summary,
            "runs": runs,
            "markdown": md,
            "warning": warning,
        },
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
