"""Benchmark 2 of issue 4: a sweep of K distillation candidates (K = 1, 4, 8), kdflow vs K independent plain runs.

The candidates differ in student width and KD settings (see `CANDIDATES`); K takes the first K. The plain side is
what a user does without kdflow: K separate runs of the hand-written PyTorch KD loop (benchmarks/baselines.py), one
fresh Python process each, one after another; the K = 1 and K = 4 totals are the sums over the first 1 and 4 of the
same 8 independent runs (they are independent, so running them again would only repeat them). The kdflow side runs
`kdflow_sweep` once per K in one process. Both sides report end-to-end wall time (process start to exit, as a user
waits for it) and training time (the training calls only), plus each candidate's test accuracy.

    python benchmarks/bench_sweep.py                  # the config's epochs, seed 0
    python benchmarks/bench_sweep.py --quick          # 2 epochs, the 3-epoch teacher: a smoke run
    python benchmarks/bench_sweep.py --ks 1,4 --epochs 10 --seeds 0,1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
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
from kdflow.engine.loop import Student, fit_many

# (student width, temperature, alpha): the first is the config's own candidate, then other KD settings, then the
# same four on a wider student. K = 4 varies the loss on one student; K = 8 adds a second architecture.
CANDIDATES = [(8, 4.0, 0.9), (8, 2.0, 0.9), (8, 8.0, 0.9), (8, 4.0, 0.5)]
CANDIDATES += [(16, t, a) for _, t, a in CANDIDATES]


def candidate_recipes(base: Recipe, k: int) -> list[Recipe]:
    if not 1 <= k <= len(CANDIDATES):
        raise ValueError(f"K={k} is out of range: 1..{len(CANDIDATES)} candidates are defined")
    return [
        dataclasses.replace(base, student_kwargs=(("width", w),), temperature=t, alpha=a) for w, t, a in CANDIDATES[:k]
    ]


def _stats(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values)}


def kdflow_sweep(
    students: list[nn.Module], recipes: list[Recipe], teacher: nn.Module, task: Task, *, seed: int, device
) -> None:
    """The kdflow side: every candidate (students[i] with recipes[i]) in one `fit_many` over one data stream,
    sharing each batch's teacher pass. The candidates share the training recipe and differ in student and loss."""
    train_cfgs = {r.train_config().model_dump_json() for r in recipes}
    if len(train_cfgs) != 1:
        raise ValueError("one data stream needs one training recipe for every candidate")
    fit_many(
        [Student(m, r.loss_config()) for m, r in zip(students, recipes)],
        task.train,
        task.val,
        recipes[0].train_config(),
        task.normalizer,
        seed=seed,
        device=device,
        teacher=teacher,
    )


def worker(spec: dict) -> dict:
    """side 'plain': one candidate, one plain run. side 'kdflow': all candidates through kdflow_sweep."""
    set_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.zeros(1, device=device)
    task = open_task(load_cfg(spec["config"]), spec["data_dir"])
    teacher, _ = read_teacher(spec["teacher_file"], task)
    recipes = [Recipe.from_json(r) for r in spec["recipes"]]
    students = [build_student(task, r, spec["seed"]) for r in recipes]
    if spec["side"] == "plain":
        from baselines import plain_kd
    warm_up(device)
    meter = MemoryMeter(device)
    meter.start()
    with Stopwatch(device) as clock:
        if spec["side"] == "kdflow":
            kdflow_sweep(students, recipes, teacher, task, seed=spec["seed"], device=device)
        else:
            (student,), (recipe,) = students, recipes
            plain_kd(student, teacher, task, recipe, seed=spec["seed"], device=device, workers=spec["workers"])
    mem = meter.stop()
    timing = clock.as_dict()
    return {
        "side": spec["side"],
        "seed": spec["seed"],
        "train_s": timing.pop("wall_s"),
        **timing,
        "test_acc": [test_accuracy(s.cpu(), task.test, task.normalizer) for s in students],
        **mem,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--epochs", type=int, help="epochs per candidate (default: the config's distill.train.epochs)")
    p.add_argument("--ks", default="1,4,8", help=f"comma-separated K values, each 1..{len(CANDIDATES)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs per candidate, a 3-epoch teacher")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads on every side")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the plain runs")
    p.add_argument("--augment", choices=["none", "crop", "crop_flip"], help="override the config's augmentation")
    p.add_argument(
        "--retries", type=int, default=2, help="rerun a run disturbed by other processes up to N times (timing only)"
    )
    p.add_argument("--out", default=str(RESULTS / "sweep.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(json.loads(args.worker))))
        return 0

    ks = sorted({int(k) for k in args.ks.split(",")})
    bad = [k for k in ks if not 1 <= k <= len(CANDIDATES)]
    if bad:
        p.error(f"--ks {bad} out of range: 1..{len(CANDIDATES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    set_threads(args.threads)
    device = resolve_device(args.device)
    cfg = load_cfg(args.config)
    base = default_recipe(
        cfg, epochs=QUICK_EPOCHS if args.quick and args.epochs is None else args.epochs, augment=args.augment
    )
    print(f"preparing data and teacher (cached in benchmarks/.cache) on {device} ...", file=sys.stderr)
    task = prepare_task(cfg)
    _, teacher_info = load_teacher(task, quick=args.quick, device=device)
    kmax = max(ks)
    recipes = candidate_recipes(base, kmax)
    print(
        f"sweep bench: K in {ks}, {base.epochs} epochs per candidate, seeds {seeds}, device {device}, "
        f"torch threads {args.threads} on every side, DataLoader workers {args.workers}",
        file=sys.stderr,
    )

    common_spec = {
        "config": str(args.config),
        "data_dir": str(task.data_dir),
        "teacher_file": str(REPO / teacher_info["file"]),
        "device": str(device),
        "threads": args.threads,
        "workers": args.workers,
    }
    plain_runs, kdflow_runs = [], []
    for seed in seeds:
        for i, r in enumerate(recipes):  # the K independent plain runs, one process each
            spec = {**common_spec, "side": "plain", "seed": seed, "recipes": [r.to_json()]}
            res = run_measured(Path(__file__), spec, args.retries)
            res["candidate"] = i
            plain_runs.append(res)
            print(
                f"  plain  seed {seed} candidate {i} {CANDIDATES[i]}: {res['process_s']:6.1f} s end to end, "
                f"{res['train_s']:6.1f} s training, test {100 * res['test_acc'][0]:.2f}%",
                file=sys.stderr,
            )
        for k in ks:
            spec = {**common_spec, "side": "kdflow", "seed": seed, "recipes": [r.to_json() for r in recipes[:k]]}
            res = run_measured(Path(__file__), spec, args.retries)
            res["k"] = k
            kdflow_runs.append(res)
            print(
                f"  kdflow seed {seed} K={k}: {res['process_s']:6.1f} s end to end, {res['train_s']:6.1f} s training, "
                f"mean test {100 * sum(res['test_acc']) / k:.2f}%",
                file=sys.stderr,
            )

    rows, summary = [], {}
    for k in ks:
        per_seed = []
        for seed in seeds:
            plain = [r for r in plain_runs if r["seed"] == seed and r["candidate"] < k]
            kd = next(r for r in kdflow_runs if r["seed"] == seed and r["k"] == k)
            per_seed.append(
                {
                    "seed": seed,
                    "plain_wall_s": sum(r["process_s"] for r in plain),
                    "plain_train_s": sum(r["train_s"] for r in plain),
                    "plain_test_acc": [r["test_acc"][0] for r in plain],
                    "plain_peak_rss_mb": max(r["peak_rss_mb"] for r in plain),
                    "kdflow_wall_s": kd["process_s"],
                    "kdflow_train_s": kd["train_s"],
                    "kdflow_test_acc": kd["test_acc"],
                    "kdflow_peak_rss_mb": kd["peak_rss_mb"],
                }
            )

        def col(key: str, per_seed: list[dict] = per_seed) -> list[float]:
            return [s[key] for s in per_seed]

        def mean_acc(key: str, per_seed: list[dict] = per_seed) -> list[float]:
            return [statistics.fmean(s[key]) for s in per_seed]

        speedup = mean_std(col("plain_wall_s"))[0] / mean_std(col("kdflow_wall_s"))[0]
        summary[k] = {
            "plain_wall_s": _stats(col("plain_wall_s")),
            "kdflow_wall_s": _stats(col("kdflow_wall_s")),
            "wall_speedup": speedup,
            "plain_train_s": _stats(col("plain_train_s")),
            "kdflow_train_s": _stats(col("kdflow_train_s")),
            "train_speedup": mean_std(col("plain_train_s"))[0] / mean_std(col("kdflow_train_s"))[0],
            "plain_mean_test_acc": _stats(mean_acc("plain_test_acc")),
            "kdflow_mean_test_acc": _stats(mean_acc("kdflow_test_acc")),
            "per_seed": per_seed,
        }
        rows.append(
            [
                str(k),
                fmt(col("plain_wall_s"), 1),
                fmt(col("kdflow_wall_s"), 1),
                f"{speedup:.2f}×",
                fmt(col("plain_train_s"), 1),
                fmt(col("kdflow_train_s"), 1),
                fmt(mean_acc("plain_test_acc"), 2, 100),
                fmt(mean_acc("kdflow_test_acc"), 2, 100),
            ]
        )
    header = [
        "K",
        "plain wall s",
        "kdflow wall s",
        "speed-up",
        "plain train s",
        "kdflow train s",
        "plain mean test %",
        "kdflow mean test %",
    ]
    md = markdown_table(header, rows)
    print(
        f"\nSweep of K candidates, MNIST -> USPS, {base.epochs} epochs each, batch {base.batch_size}, "
        f"{len(seeds)} seed(s), {device}, {args.threads} torch threads (wall = process start to exit, summed over "
        f"the K plain runs)\n"
    )
    print(md)
    warning = busy_warning(
        plain_runs + kdflow_runs,
        lambda r: f"plain seed {r['seed']} candidate {r['candidate']}" if "candidate" in r else f"kdflow K={r['k']}",
    )
    if warning:
        print(f"\n{warning}")
    write_json(
        Path(args.out),
        {
            "benchmark": "sweep",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(device, args.threads),
            "dataloader_workers": args.workers,
            "config": display_path(args.config),
            "base_recipe": base.to_json(),
            "candidates": [{"width": w, "temperature": t, "alpha": a} for w, t, a in CANDIDATES[:kmax]],
            "teacher": teacher_info,
            "seeds": seeds,
            "quick": args.quick,
            "summary": {str(k): v for k, v in summary.items()},
            "plain_runs": plain_runs,
            "kdflow_runs": kdflow_runs,
            "markdown": md,
            "warning": warning,
        },
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
