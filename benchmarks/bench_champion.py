"""Benchmark 4 of issue 4: what the user gets. The teacher against the champion student that a
`kdflow run --config configs/mnist_to_usps.yaml` promoted: parameters, MACs, serialized size, CPU latency at
batch 1 and 64, test accuracy.

The models come from the run's MLflow registry (`<home>/mlflow.db`): the champion is the version holding the
`registry.alias` of `registry.model_name`; the teacher is the `registry.teacher_model_name` version the champion
was distilled from (its `kdflow.teacher_version` tag; the latest version when the tag is missing). Both are
measured from their weights-only checkpoints in the run's local pipeline root (spec.json + model.pt, the files the
registered pt2 models were exported from), found by the versions' MLflow run ids; test accuracy is recomputed on
the run's prepared test split and checked against the test_top1 the pipeline logged.

    python benchmarks/bench_champion.py                       # runs the pipeline on MNIST -> USPS first
    python benchmarks/bench_champion.py --home H              # reuse a finished run's home (bench_pipeline.py
                                                              #   --keep-homes DIR keeps them)
    python benchmarks/bench_champion.py --quick               # 2-epoch pipeline run: a smoke test

Latency: `kdflow.evaluate.cpu_latency_ms` (median of `--repeats` forward passes after `--warmup`), with 1 torch
thread and with every core, teacher and champion measured alternately for `--rounds` rounds (median over rounds),
so a load change on the machine hits both. Prints a markdown table and writes benchmarks/results/champion.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_pipeline import QUICK_SETS, machine, run_pipeline
from common import REPO, RESULTS, display_path, machine_cpu_s, markdown_table, write_json

from kdflow import data, evaluate, models, tracking
from kdflow.config import load_config
from kdflow.evaluate import accuracy, predict
from kdflow.models import checkpoint

DEFAULT_CONFIG = REPO / "configs" / "mnist_to_usps.yaml"
TARGETS = {"macs_ratio": 5.0, "latency_b1_ratio": 3.0, "accuracy_points": 1.0}
BATCHES = (1, 64)
EPOCH_KEYS = ("teacher.pretrain.epochs", "teacher.finetune.epochs", "distill.train.epochs")
BUSY_CORES = 0.3


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _info_dirs(root: Path) -> list[Path]:
    """Every checkpoint folder (info.json + spec.json + model.pt) under the local pipeline root."""
    return [p.parent for p in root.glob("*/**/info.json") if (p.parent / checkpoint.SPEC_FILE).is_file()]


def find_checkpoint(root: Path, run_id: str, what: str) -> Path:
    """The checkpoint folder whose info.json names MLflow run `run_id`."""
    hits = [d for d in _info_dirs(root) if json.loads((d / "info.json").read_text()).get("run_id") == run_id]
    if not hits:
        raise SystemExit(
            f"no checkpoint of the {what} (MLflow run {run_id}) under {root}: was it registered by a run in "
            "another home, or has the pipeline root been cleaned?"
        )
    return hits[0]


def run_folder(root: Path, ckpt: Path) -> Path:
    """The pipeline run folder (pipeline-root/<run>) that holds `ckpt`."""
    return root / ckpt.relative_to(root).parts[0]


def locate(home: Path, cfg) -> dict[str, Any]:
    """Registry versions of the champion and its teacher, with their checkpoints and the run's data folder."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.embedded_tracking_uri(home))
    reg = cfg.registry
    champ = _alias_version(client, reg.model_name, reg.alias)
    tversion = champ.tags.get("kdflow.teacher_version")
    if tversion is not None:
        teacher = client.get_model_version(reg.teacher_model_name, tversion)
        teacher_how = "the champion's kdflow.teacher_version tag"
    else:
        versions = client.search_model_versions(f"name='{reg.teacher_model_name}'")
        if not versions:
            raise SystemExit(f"no registered model {reg.teacher_model_name!r} in {home / 'mlflow.db'}")
        teacher = max(versions, key=lambda v: int(v.version))
        teacher_how = "the latest version"
    root = home / "pipeline-root"
    champ_dir = find_checkpoint(root, champ.run_id, f"champion {reg.model_name} v{champ.version}")
    teacher_dir = find_checkpoint(root, teacher.run_id, f"teacher {reg.teacher_model_name} v{teacher.version}")
    data_dir = run_folder(root, champ_dir) / "data-prep" / "data"
    out = {"client": client, "data_dir": data_dir}
    for key, mv, ckpt, name in (
        ("teacher", teacher, teacher_dir, reg.teacher_model_name),
        ("champion", champ, champ_dir, reg.model_name),
    ):
        run = client.get_run(mv.run_id)
        try:
            registered = Path(client.get_model_version_download_uri(name, mv.version).removeprefix("file://"))
            registered_bytes = _dir_bytes(registered) if registered.is_dir() else None
        except Exception:  # a remote artifact store: not measured here
            registered_bytes = None
        out[key] = {
            "model_name": name,
            "version": int(mv.version),
            "run_id": mv.run_id,
            "candidate": mv.tags.get("kdflow.candidate"),
            "prune_ratio": mv.tags.get("kdflow.prune_ratio"),
            "loss": mv.tags.get("kdflow.loss_name"),
            "checkpoint": ckpt,
            "logged_metrics": dict(run.data.metrics),
            "registered_artifact_bytes": registered_bytes,
        }
    out["teacher"]["chosen_by"] = teacher_how
    # the training lengths the run used (its parent run logs the flattened config), against the config's own
    parent_id = client.get_run(champ.run_id).data.tags.get("mlflow.parentRunId")
    params = client.get_run(parent_id).data.params if parent_id else {}
    flat = cfg.flat()
    out["run_epochs"] = {k: params.get(k) for k in EPOCH_KEYS}
    out["config_epochs"] = {k: str(flat.get(k)) for k in EPOCH_KEYS}
    return out


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise SystemExit(
            f"{name!r} has no version with alias {alias!r} ({err.error_code}): the run promoted no champion, or it "
            "ran another config than --config (whose registry names are looked up)"
        ) from None


def measure(
    models_: dict[str, torch.nn.Module],
    example: torch.Tensor,
    threads: list[int],
    warmup: int,
    repeats: int,
    rounds: int,
) -> tuple[dict[str, dict[str, float]], float | None]:
    """Median CPU latency (ms) per model, thread count and batch size, models alternating within each round.
    Returns (latencies keyed by model then `b{batch}_t{threads}`, other processes' average core use meanwhile)."""
    samples: dict[str, dict[str, list[float]]] = {m: {} for m in models_}
    machine0, cpu0, t0 = machine_cpu_s(), time.process_time(), time.perf_counter()
    for _ in range(rounds):
        for t in threads:
            for b in BATCHES:
                for name, model in models_.items():
                    ms = evaluate.cpu_latency_ms(model, example, b, warmup, repeats, t)
                    samples[name].setdefault(f"b{b}_t{t}", []).append(ms)
    wall, cpu, machine1 = time.perf_counter() - t0, time.process_time() - cpu0, machine_cpu_s()
    other = max(0.0, (machine1 - machine0 - cpu) / wall) if machine0 is not None else None
    return {m: {k: statistics.median(v) for k, v in s.items()} for m, s in samples.items()}, other


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", help="home of a finished `kdflow run` (default: run the pipeline into a fresh one)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the run's config (registry names; the run itself)")
    p.add_argument("--quick", action="store_true", help="2-epoch pipeline run: --set " + " --set ".join(QUICK_SETS))
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra override for the pipeline run")
    p.add_argument("--keep-home", metavar="DIR", help="keep the pipeline run's home under DIR (default: deleted)")
    p.add_argument("--threads", help=f"comma-separated torch thread counts (default: 1,{_cores()})")
    p.add_argument("--warmup", type=int, default=10, help="untimed forward passes before each latency measurement")
    p.add_argument("--repeats", type=int, default=100, help="timed forward passes per latency measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating teacher/champion rounds (median over rounds)")
    p.add_argument("--out", default=str(RESULTS / "champion.json"))
    args = p.parse_args(argv)
    for flag in ("warmup", "repeats", "rounds"):
        if getattr(args, flag) < (0 if flag == "warmup" else 1):
            p.error(f"--{flag} is too small: {getattr(args, flag)}")
    threads = sorted({int(t) for t in (args.threads or f"1,{_cores()}").split(",") if t.strip()})
    if any(t < 1 for t in threads):
        p.error(f"--threads must list counts ≥ 1, got {args.threads!r}")
    if args.home and (args.quick or args.sets or args.keep_home):
        p.error("--home reuses a finished run: --quick, --set and --keep-home apply only to a new run")
    cfg = load_config(args.config)

    scratch = None
    pipeline_run = None
    if args.home:
        home = Path(args.home).resolve()
        if not (home / "mlflow.db").is_file():
            p.error(f"--home {home} holds no mlflow.db: not the home of a finished kdflow run")
    else:
        parent = Path(args.keep_home).resolve() if args.keep_home else Path(tempfile.mkdtemp(prefix="kdflow-champ-"))
        scratch = None if args.keep_home else parent
        home = parent / f"{time.strftime('%Y%m%d-%H%M%S')}-champion"
        home.parent.mkdir(parents=True, exist_ok=True)
        sets = (QUICK_SETS if args.quick else []) + args.sets
        print(f"kdflow run --config {display_path(args.config)} --home {home} ...", file=sys.stderr)
        pipeline_run = run_pipeline(Path(args.config).resolve(), home, sets)
        pipeline_run["sets"] = sets
        print(f"  pipeline finished in {pipeline_run['wall_s']:.1f} s", file=sys.stderr)
    try:
        found = locate(home, cfg)
        result = benchmark(found, threads, args)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    md = table(result, threads)
    c = result["comparison"]
    print(f"\nTeacher vs champion, {cfg.experiment} ({display_path(args.config)}){' (quick)' if args.quick else ''}\n")
    print(md)
    print(
        f"\nchampion {result['champion']['candidate']}: {c['macs_ratio']:.1f}× fewer MACs (target ≥ "
        f"{TARGETS['macs_ratio']:.0f}×: {'met' if c['macs_met'] else 'not met'}), {c['latency_b1_ratio']:.2f}× lower "
        f"batch-1 latency at 1 thread (target ≥ {TARGETS['latency_b1_ratio']:.0f}×: "
        f"{'met' if c['latency_met'] else 'not met'}), test accuracy {c['accuracy_gap_points']:+.2f} points vs the "
        f"teacher (target within {TARGETS['accuracy_points']:.0f}: {'met' if c['accuracy_met'] else 'not met'})"
    )
    if not result["full_training"]:
        print(f"\nnote: the run trained shorter than {display_path(args.config)} says: {result['run_epochs']}")
    warning = ""
    if (result["other_cores"] or 0) > BUSY_CORES:
        warning = (
            f"WARNING: other processes kept {result['other_cores']:.1f} cores busy on average during the latency "
            "measurements: latencies are disturbed; rerun on an idle machine."
        )
        print(f"\n{warning}")
    for key in ("teacher", "champion"):
        result[key]["checkpoint"] = display_path(result[key]["checkpoint"])
    if scratch is not None:
        result["home"] = None
        if pipeline_run:
            pipeline_run["home"] = pipeline_run["log"] = None
    write_json(
        Path(args.out),
        {
            "benchmark": "champion",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine(),
            "config": display_path(args.config),
            "quick": args.quick,
            "latency": {"warmup": args.warmup, "repeats": args.repeats, "rounds": args.rounds, "threads": threads},
            "pipeline_run": pipeline_run,
            "targets": TARGETS,
            **result,
            "markdown": md,
            "warning": warning,
        },
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def benchmark(found: dict[str, Any], threads: list[int], args) -> dict[str, Any]:
    data_dir = found["data_dir"]
    manifest = data.read_manifest(data_dir)
    norm = data.Normalizer.from_manifest(manifest)
    x_test, y_test = data.load_split(data_dir, "target", "test")
    x_train, _ = data.load_split(data_dir, "target", "train")
    example = norm(x_train[:8]).float()  # what the pipeline's profile step feeds (normalised target images)
    nets = {}
    out = {
        "home": str(found["data_dir"].parents[3]),
        "data_dir": display_path(data_dir),
        "run_epochs": found["run_epochs"],
        "full_training": found["run_epochs"] == found["config_epochs"],
    }
    for key in ("teacher", "champion"):
        entry = found[key]
        net, spec = checkpoint.load(entry["checkpoint"])
        nets[key] = net
        top1 = accuracy(predict(net, x_test, norm), y_test)
        logged = entry["logged_metrics"].get("test_top1")
        if logged is not None and abs(logged - top1) > 1e-6:
            raise SystemExit(
                f"{key} test top-1 recomputed on {data_dir} is {top1:.6f}, the pipeline logged {logged:.6f}: "
                "the checkpoint or data folder does not belong to this registry version"
            )
        flops = evaluate.flops(net, example)
        out[key] = {
            **{k: v for k, v in entry.items() if k != "logged_metrics"},
            "arch": spec["arch"],
            "arch_kwargs": spec["kwargs"],
            "conv_channels": [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)],
            "params": models.count_params(net),
            "macs": flops // 2,
            "size_bytes": checkpoint.file_size(entry["checkpoint"]),
            "test_top1": top1,
            "test_top1_logged": logged,
            "val_top1_logged": entry["logged_metrics"].get("val_top1"),
            "test_images": len(y_test),
        }
    torch.manual_seed(0)
    latency, other = measure(nets, example, threads, args.warmup, args.repeats, args.rounds)
    for key in nets:
        out[key]["latency_ms"] = latency[key]
    t, c = out["teacher"], out["champion"]
    one = f"b1_t{min(threads)}"
    comp = {
        "params_ratio": t["params"] / c["params"],
        "macs_ratio": t["macs"] / c["macs"],
        "size_ratio": t["size_bytes"] / c["size_bytes"],
        "latency_ratio": {k: t["latency_ms"][k] / c["latency_ms"][k] for k in t["latency_ms"]},
        "latency_b1_ratio": t["latency_ms"][one] / c["latency_ms"][one],
        "latency_b1_threads": min(threads),
        "accuracy_gap_points": 100 * (c["test_top1"] - t["test_top1"]),
    }
    comp["macs_met"] = comp["macs_ratio"] >= TARGETS["macs_ratio"]
    comp["latency_met"] = comp["latency_b1_ratio"] >= TARGETS["latency_b1_ratio"]
    comp["accuracy_met"] = comp["accuracy_gap_points"] >= -TARGETS["accuracy_points"]
    comp["all_met"] = comp["macs_met"] and comp["latency_met"] and comp["accuracy_met"]
    out["comparison"] = comp
    out["other_cores"] = other
    return out


def _arch(m: dict[str, Any]) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in m["arch_kwargs"].items())
    pruned = f", pruned at ratio {float(m['prune_ratio']):g}" if m.get("prune_ratio") else ""
    channels = f", conv channels {'-'.join(map(str, m['conv_channels']))}" if m.get("conv_channels") else ""
    return f"{m['arch']}({kwargs}){pruned}{channels}" + (f", loss {m['loss']}" if m.get("loss") else "")


def table(r: dict[str, Any], threads: list[int]) -> str:
    t, c, comp = r["teacher"], r["champion"], r["comparison"]
    rows = [
        ["model", f"{t['model_name']} v{t['version']}", f"{c['model_name']} v{c['version']} ({c['candidate']})", ""],
        ["architecture", _arch(t), _arch(c), ""],
        ["params", f"{t['params']:,}", f"{c['params']:,}", f"{comp['params_ratio']:.1f}×"],
        ["MACs / image", f"{t['macs']:,}", f"{c['macs']:,}", f"{comp['macs_ratio']:.1f}×"],
        ["model.pt bytes", f"{t['size_bytes']:,}", f"{c['size_bytes']:,}", f"{comp['size_ratio']:.1f}×"],
    ]
    if t["registered_artifact_bytes"] and c["registered_artifact_bytes"]:
        ratio = t["registered_artifact_bytes"] / c["registered_artifact_bytes"]
        rows.append(
            [
                "registered model bytes (pt2 + MLmodel)",
                f"{t['registered_artifact_bytes']:,}",
                f"{c['registered_artifact_bytes']:,}",
                f"{ratio:.1f}×",
            ]
        )
    for n in threads:
        for b in BATCHES:
            k = f"b{b}_t{n}"
            rows.append(
                [
                    f"CPU latency ms, batch {b}, {n} thread{'s' if n > 1 else ''}",
                    f"{t['latency_ms'][k]:.3f}",
                    f"{c['latency_ms'][k]:.3f}",
                    f"{comp['latency_ratio'][k]:.2f}×",
                ]
            )
    rows.append(
        [
            f"test top-1 % ({t['test_images']} images)",
            f"{100 * t['test_top1']:.2f}",
            f"{100 * c['test_top1']:.2f}",
            f"{comp['accuracy_gap_points']:+.2f} points",
        ]
    )
    return markdown_table(["", "teacher", "champion", "teacher / champion"], rows)


if __name__ == "__main__":
    sys.exit(main())
