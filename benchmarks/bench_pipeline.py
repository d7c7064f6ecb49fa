"""Benchmark 3 of issue 4: end-to-end wall time of the local pipeline (`kdflow run`), split into the steps' own
compute and everything else (process start, imports, MLflow, artifact I/O, orchestration).

Each run is `python -m kdflow.cli run --home <fresh folder> [--config ...]` in a subprocess, timed from outside.
Every step process prints `[kdflow-timing] step=<step> compute_s=<s> wall_s=<s>` into the run log
(<home>/logs/run-*.log), next to kfp.local's own "Executing task" / "finished" lines with HH:MM:SS.mmm timestamps.

    compute on the critical path = data-prep + teacher + prune + loop + register + finalize
    loop = makespan of the (distill -> evaluate) chains, one per ParallelFor iteration, scheduled greedily in
           iteration order on 2 workers (kfp.local runs at most 2 iterations at once)
    overhead = wall - compute on the critical path;  overhead share = overhead / wall

Prints a markdown table and writes benchmarks/results/pipeline.json.

    python benchmarks/bench_pipeline.py                      # default config and MNIST -> USPS, once each
    python benchmarks/bench_pipeline.py --quick              # 2-epoch smoke run
    python benchmarks/bench_pipeline.py --repeats 3 --configs default
    python benchmarks/bench_pipeline.py --keep-homes benchmarks/.cache/runs   # keep homes for bench_champion.py
    python benchmarks/bench_pipeline.py --repeats 3 --reuse-store   # run 1 creates the store, runs 2-3 reuse it
    python benchmarks/bench_pipeline.py --parse-log kdflow-home/logs/run-....log   # analyse an existing run log
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, display_path, machine_cpu_s, markdown_table, mean_std, write_json

CONFIGS = {"default": None, "mnist_to_usps": REPO / "configs" / "mnist_to_usps.yaml"}
QUICK_SETS = ["distill.train.epochs=2", "teacher.pretrain.epochs=2", "teacher.finetune.epochs=2"]
TARGET_OVERHEAD_SHARE = 0.20  # of the default run's wall time
LOCAL_PARALLELISM = 2  # kfp.local's cap on concurrent ParallelFor iterations
BUSY_CORES = 0.3

# the step names of the timing lines, and the kfp task (= output folder) each runs as
STEP_TASK = {
    "data-prep": "data-prep",
    "teacher": "train-teacher",
    "prune": "prune",
    "distill": "distill",
    "evaluate": "evaluate",
    "register": "register",
    "finalize": "finalize",
}
SEQUENTIAL = ("data-prep", "teacher", "prune", "register", "finalize")
LOOP = ("distill", "evaluate")

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) - \w+ - (.*)$")
TIMING = re.compile(r"\[kdflow-timing\]\s+(.*)$")
PAIR = re.compile(r"([A-Za-z_][\w-]*)=(\S+)")
WROTE = re.compile(r"Wrote executor output file to (\S+)/executor_output\.json")
ITERATION = re.compile(r"for-loop-\d+-iteration-(\d+)$")
EXECUTING = re.compile(r"^Executing task '([^']+)'")
FINISHED = re.compile(r"^Task '([^']+)' finished with status (\w+)")
PIPELINE_START = re.compile(r"^Running pipeline: '([^']+)'")
PIPELINE_END = re.compile(r"^Pipeline '([^']+)' finished with status (\w+)")


class LogError(ValueError):
    """The run log lacks what the analysis needs (or holds a malformed timing line)."""


# ------------------------------------------------------------------------------------------------ parsing


@dataclass
class Timing:
    step: str
    compute_s: float
    wall_s: float
    line: int
    extra: dict[str, str] = field(default_factory=dict)
    iteration: int | None = None  # ParallelFor iteration of a distill/evaluate step


@dataclass
class ParsedLog:
    timings: list[Timing]
    events: list[tuple[float, str, str, int]]  # (seconds of day, kind, task, line): start | finish
    pipeline_start: float | None
    pipeline_end: float | None
    pipeline_status: str | None
    pairing: str  # how loop steps were matched to iterations: explicit | executor-output | order | none
    ambiguous: int = 0  # executor-output matches that may have crossed (see _assign_iterations)


def _seconds_of_day(m: re.Match) -> float:
    h, mi, s, ms = (int(g) for g in m.groups()[:4])
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_timing_line(text: str, line: int) -> Timing:
    """One `[kdflow-timing] step=.. compute_s=.. wall_s=..` line; extra key=value fields are kept."""
    m = TIMING.search(text)
    fields = dict(PAIR.findall(m.group(1)))
    missing = [k for k in ("step", "compute_s", "wall_s") if k not in fields]
    if missing:
        raise LogError(f"timing line {line} lacks {missing}: {text.strip()!r}")
    step = fields.pop("step")
    if step not in STEP_TASK:
        raise LogError(f"timing line {line} names unknown step {step!r} (known: {', '.join(STEP_TASK)})")
    try:
        compute_s, wall_s = float(fields.pop("compute_s")), float(fields.pop("wall_s"))
    except ValueError:
        raise LogError(f"timing line {line} has a non-numeric time: {text.strip()!r}") from None
    t = Timing(step, compute_s, wall_s, line, fields)
    if "iteration" in fields:  # an explicit iteration index wins over any inference
        t.iteration = int(fields["iteration"])
    return t


def parse_log(text: str) -> ParsedLog:
    """Timing lines, kfp.local's task start/finish events, and the ParallelFor iteration of each loop step.

    Parallel iterations' output interleaves line by line, so a loop step's timing line is matched to the first
    later `Wrote executor output file to .../for-loop-*-iteration-<k>/<task>/` line of the same task not yet
    matched: a step process prints its timing line right before the KFP executor writes its outputs."""
    timings: list[Timing] = []
    wrote: list[tuple[int, str, int | None]] = []  # (line, task folder, iteration)
    events: list[tuple[float, str, str, int]] = []
    p_start = p_end = p_status = None
    for i, raw in enumerate(text.splitlines(), 1):
        line = ANSI.sub("", raw)
        if "[kdflow-timing]" in line:
            timings.append(parse_timing_line(line, i))
            continue
        w = WROTE.search(line)
        if w:
            folder = Path(w.group(1))
            it = ITERATION.search(folder.parent.name)
            wrote.append((i, folder.name, int(it.group(1)) if it else None))
            continue
        s = STAMP.match(line.strip())
        if not s:
            continue
        t, msg = _seconds_of_day(s), s.group(5)
        if m := EXECUTING.match(msg):
            events.append((t, "start", m.group(1), i))
        elif m := FINISHED.match(msg):
            events.append((t, "finish", m.group(1), i))
        elif m := PIPELINE_START.match(msg):
            p_start = t
        elif m := PIPELINE_END.match(msg):
            p_end, p_status = t, m.group(2)
    pairing, ambiguous = _assign_iterations(timings, wrote)
    return ParsedLog(timings, events, p_start, p_end, p_status, pairing, ambiguous)


def _task_matches(folder: str, step: str) -> bool:
    task = STEP_TASK[step]
    return folder == task or folder.endswith("-" + task)


def _assign_iterations(timings: list[Timing], wrote: list[tuple[int, str, int | None]]) -> tuple[str, int]:
    """Set each loop step's ParallelFor iteration; returns (how, ambiguous matches). A match is ambiguous when
    another timing line of the same task came between the step's own line and the executor line it took: the two
    processes then finished within moments of each other and their lines may have crossed."""
    loop = [t for t in timings if t.step in LOOP]
    if not loop:
        return "none", 0
    if all(t.iteration is not None for t in loop):
        return "explicit", 0
    claimed: set[int] = set()
    ambiguous = 0
    for t in loop:
        match = next(
            (
                k
                for k, (ln, folder, it) in enumerate(wrote)
                if k not in claimed and ln > t.line and it is not None and _task_matches(folder, t.step)
            ),
            None,
        )
        if match is None:
            break
        claimed.add(match)
        t.iteration = wrote[match][2]
        ambiguous += any(o is not t and o.step == t.step and t.line < o.line < wrote[match][0] for o in loop)
    else:
        return "executor-output", ambiguous
    # no usable executor lines: the k-th distill and the k-th evaluate form chain k
    for step in LOOP:
        for k, t in enumerate(x for x in loop if x.step == step):
            t.iteration = k
    return "order", 0


# ----------------------------------------------------------------------------------------------- analysis


def greedy_makespan(chains: list[float], workers: int = LOCAL_PARALLELISM) -> float:
    """Makespan of jobs taken in order by whichever of `workers` frees first (a thread pool's schedule)."""
    free = [0.0] * workers
    for c in chains:
        k = min(range(workers), key=free.__getitem__)
        free[k] += c
    return max(free) if chains else 0.0


def _task_walls(events: list[tuple[float, str, str, int]]) -> dict[str, list[float]]:
    """kfp.local's wall time of each task (Executing -> finished), per task name. Tasks of one name are paired
    first-in first-out, which keeps each name's total exact even where parallel iterations' order differs."""
    open_: dict[str, list[float]] = {}
    out: dict[str, list[float]] = {}
    for t, kind, task, _ in events:
        if kind == "start":
            open_.setdefault(task, []).append(t)
        elif open_.get(task):
            out.setdefault(task, []).append((t - open_[task].pop(0)) % 86400)
    return out


def analyse(log: ParsedLog, wall_s: float | None = None, start_tod: float | None = None) -> dict[str, Any]:
    """Critical-path compute, overhead and its breakdown. `wall_s` and `start_tod` (local time of day, in
    seconds, when the command started) add the command's wall time and the time spent outside the pipeline."""
    by_step: dict[str, list[Timing]] = {s: [t for t in log.timings if t.step == s] for s in STEP_TASK}
    missing = [s for s in STEP_TASK if not by_step[s]]
    if missing:
        raise LogError(
            f"no [kdflow-timing] line for step(s) {missing} in the run log "
            f"(found {sorted({t.step for t in log.timings}) or 'none'}): the step did not run (failed, served from "
            "the cache) or this kdflow does not print timing lines"
        )
    loop_lines = by_step["distill"] + by_step["evaluate"]
    pairing = log.pairing
    if all("candidates" in t.extra for t in loop_lines):  # the steps name their candidate group: exact pairing
        pairing = "candidates"
    chains: dict[Any, dict[str, Any]] = {}
    for t in loop_lines:
        key = t.extra["candidates"] if pairing == "candidates" else t.iteration
        chain = chains.setdefault(key, {"order": (float("inf"), float("inf"))})
        if t.step in chain:
            raise LogError(f"two {t.step} timing lines for ParallelFor chain {key!r}")
        chain[t.step] = t.compute_s
        it = t.iteration if t.iteration is not None else float("inf")
        chain["order"] = min(chain["order"], (it, t.line))
    incomplete = sorted(str(k) for k, c in chains.items() if not set(LOOP) <= set(c))
    if incomplete:
        raise LogError(f"ParallelFor chain(s) {incomplete} lack a distill or an evaluate timing line")
    chain_list = [
        {
            "chain": k,
            "distill_compute_s": c["distill"],
            "evaluate_compute_s": c["evaluate"],
            "compute_s": c["distill"] + c["evaluate"],
        }
        for k, c in sorted(chains.items(), key=lambda kc: kc[1]["order"])  # iteration order = scheduling order
    ]
    chain_computes = [c["compute_s"] for c in chain_list]
    loop_compute = greedy_makespan(chain_computes)
    walls = _task_walls(log.events)
    steps = {}
    for s, ts in by_step.items():
        task_walls = walls.get(STEP_TASK[s], [])
        steps[s] = {
            "count": len(ts),
            "compute_s": sum(t.compute_s for t in ts),
            "wall_s": sum(t.wall_s for t in ts),  # the step function's time inside its process
            "task_s": sum(task_walls) if task_walls else None,  # kfp.local: process start to exit
        }
    critical = sum(steps[s]["compute_s"] for s in SEQUENTIAL) + loop_compute

    out: dict[str, Any] = {
        "pairing": pairing,
        "ambiguous_pairs": log.ambiguous if pairing == "executor-output" else 0,
        "steps": steps,
        "chains": chain_list,
        "loop": {
            "chains": len(chain_list),
            "compute_s": loop_compute,  # greedy 2-worker makespan
            "compute_bound_s": max(sum(chain_computes) / LOCAL_PARALLELISM, max(chain_computes, default=0.0)),
            "compute_total_s": sum(chain_computes),
        },
        "critical_compute_s": critical,
        "pipeline_status": log.pipeline_status,
    }
    pipeline_s = None
    if log.pipeline_start is not None and log.pipeline_end is not None:
        pipeline_s = (log.pipeline_end - log.pipeline_start) % 86400
    out["pipeline_s"] = pipeline_s
    loop_starts = [t for t, kind, task, _ in log.events if kind == "start" and task in ("distill",)]
    loop_ends = [t for t, kind, task, _ in log.events if kind == "finish" and task in ("evaluate",)]
    loop_span = (max(loop_ends) - min(loop_starts)) % 86400 if loop_starts and loop_ends else None
    out["loop"]["span_s"] = loop_span

    breakdown: dict[str, float | None] = {}
    if all(steps[s]["task_s"] is not None for s in SEQUENTIAL):
        # the first step's process also waits for the step server to finish its imports (torch, MLflow, ...)
        first = SEQUENTIAL[0]
        breakdown["server_wait_s"] = steps[first]["task_s"] - steps[first]["wall_s"]
        breakdown["step_process_s"] = sum(steps[s]["task_s"] - steps[s]["wall_s"] for s in SEQUENTIAL[1:])
        breakdown["step_non_compute_s"] = sum(steps[s]["wall_s"] - steps[s]["compute_s"] for s in SEQUENTIAL)
        if loop_span is not None:
            breakdown["loop_s"] = loop_span - loop_compute
            if pipeline_s is not None:
                breakdown["between_tasks_s"] = pipeline_s - loop_span - sum(steps[s]["task_s"] for s in SEQUENTIAL)
    if wall_s is not None:
        out["wall_s"] = wall_s
        out["overhead_s"] = wall_s - critical
        out["overhead_share"] = (wall_s - critical) / wall_s
        if start_tod is not None and pipeline_s is not None:
            pre = (log.pipeline_start - start_tod) % 86400
            breakdown["before_pipeline_s"] = pre  # interpreter start, imports, config, MLflow store creation
            breakdown["after_pipeline_s"] = wall_s - pre - pipeline_s  # summary, interpreter exit
    out["breakdown"] = breakdown
    return out


# ---------------------------------------------------------------------------------------------------- runs


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    versions = {}
    for pkg in ("torch", "mlflow", "kfp"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_cores_available": usable,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


FLOOR_IMPORTS = {"python": "pass", "import torch": "import torch", "import torch, mlflow": "import torch, mlflow"}


def import_floor(repeats: int = 3) -> dict[str, float]:
    """Median wall time of a bare Python that only imports torch (and MLflow): a lower bound on the fixed cost
    of any Python runner of these steps, however it is orchestrated."""
    out = {}
    for label, code in FLOOR_IMPORTS.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - t0)
        out[label] = sorted(times)[len(times) // 2]
    return out


def _time_of_day(epoch: float) -> float:
    lt = time.localtime(epoch)
    return lt.tm_hour * 3600 + lt.tm_min * 60 + lt.tm_sec + (epoch % 1)


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_pipeline(
    config: Path | None, home: Path, sets: list[str], timeout: float | None = None, reuse: bool = False
) -> dict[str, Any]:
    """One `kdflow run` into `home`, timed from outside; returns the analysed record. `home` must not exist
    yet unless `reuse`: then an existing home's MLflow store is reused, as by a user's next run."""
    if home.exists() and not reuse:
        raise FileExistsError(f"run home {home} already exists: every benchmark run needs a fresh one")
    old_logs = set((home / "logs").glob("run-*.log"))
    cmd = [sys.executable, "-m", "kdflow.cli", "run", "--home", str(home)]
    if config is not None:
        cmd += ["--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "KDFLOW_HOME")}
    env["COLUMNS"] = "120"
    machine0, cpu0 = machine_cpu_s(), _children_cpu_s()
    start_epoch, t0 = time.time(), time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    machine1 = machine_cpu_s()
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    logs = sorted(set((home / "logs").glob("run-*.log")) - old_logs)
    if len(logs) != 1:
        raise RuntimeError(f"expected one new run log in {home / 'logs'}, found {[p.name for p in logs]}")
    record: dict[str, Any] = {
        "command": " ".join(["python", *cmd[1:]]),
        "wall_s": wall,
        "cpu_s": cpu,
        "other_cores": max(0.0, (machine1 - machine0 - cpu) / wall) if machine0 is not None else None,
        "log": str(logs[0]),
        "home": str(home),
    }
    try:
        record.update(analyse(parse_log(logs[0].read_text()), wall, _time_of_day(start_epoch)))
    except LogError as err:
        record["error"] = str(err)
    return record


def _config_arg(name: str) -> tuple[str, Path | None]:
    if name in CONFIGS:
        return name, CONFIGS[name]
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--configs: {name!r} is neither one of {', '.join(CONFIGS)} nor a config file")
    return path.stem, path.resolve()


# ------------------------------------------------------------------------------------------------- report


def stat(values: list[float]) -> dict[str, float] | None:
    """Mean and sample standard deviation (0 for one value); None without values."""
    if not values:
        return None
    m, sd = mean_std(values)
    return {"mean": m, "std": sd}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"runs": len(runs), "analysed": len(ok), "wall_s": stat([r["wall_s"] for r in runs])}
    if not ok:
        return out
    for key in ("critical_compute_s", "overhead_s", "overhead_share", "pipeline_s"):
        out[key] = stat([r[key] for r in ok if r.get(key) is not None])
    keys = sorted({k for r in ok for k in r["breakdown"]})
    out["breakdown"] = {k: stat([r["breakdown"][k] for r in ok if k in r["breakdown"]]) for k in keys}
    out["steps"] = {
        s: {
            k: stat([r["steps"][s][k] for r in ok if r["steps"][s][k] is not None])
            for k in ("compute_s", "wall_s", "task_s")
        }
        for s in STEP_TASK
    }
    out["loop_compute_s"] = stat([r["loop"]["compute_s"] for r in ok])
    out["loop_span_s"] = stat([r["loop"]["span_s"] for r in ok if r["loop"]["span_s"] is not None])
    return out


def _ms(v: dict[str, float] | None, digits: int = 1, scale: float = 1.0, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    m, sd = v["mean"] * scale, v["std"] * scale
    unit = "%" if pct else ""
    return f"{m:.{digits}f}{unit}" if sd == 0 else f"{m:.{digits}f} ± {sd:.{digits}f}{unit}"


def tables(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    header = ["", *names]
    rows = []

    def row(label, fn):
        rows.append([label, *(fn(results[n]["summary"]) for n in names)])

    row("runs", lambda s: f"{s['analysed']}/{s['runs']}")
    row("wall s (kdflow run)", lambda s: _ms(s["wall_s"]))
    row("compute on critical path s", lambda s: _ms(s.get("critical_compute_s")))
    row("overhead s", lambda s: _ms(s.get("overhead_s")))
    row("overhead share", lambda s: _ms(s.get("overhead_share"), scale=100, pct=True))
    labels = {
        "before_pipeline_s": "· before pipeline (CLI start, imports, store) s",
        "after_pipeline_s": "· after pipeline (summary, exit) s",
        "server_wait_s": "· first step's process: start, waiting for the step server's imports s",
        "step_process_s": "· later steps' processes: start, KFP executor, fork s",
        "step_non_compute_s": "· inside steps, not compute (MLflow, I/O) s",
        "loop_s": "· distill/evaluate loop, not compute s",
        "between_tasks_s": "· between tasks (kfp.local) s",
    }
    for key, label in labels.items():
        row(label, lambda s, key=key: _ms((s.get("breakdown") or {}).get(key)))
    md = markdown_table(header, rows)

    step_rows = []
    for n in names:
        steps = results[n]["summary"].get("steps")
        if not steps:
            continue
        for st in STEP_TASK:
            v = steps[st]
            step_rows.append([n, st, _ms(v["compute_s"], 2), _ms(v["wall_s"], 2), _ms(v["task_s"], 2)])
        step_rows.append(
            [
                n,
                "loop (critical path)",
                _ms(results[n]["summary"]["loop_compute_s"], 2),
                "",
                _ms(results[n]["summary"]["loop_span_s"], 2),
            ]
        )
    if step_rows:
        md += "\n\n" + markdown_table(
            ["config", "step", "compute s", "in-process wall s", "kfp task wall s"], step_rows
        )
        md += "\n\n(distill and evaluate rows sum over all ParallelFor iterations; the loop row is the critical path)"
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs",
        default="default,mnist_to_usps",
        help=f"comma-separated: {', '.join(CONFIGS)} or paths to config files",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per config (mean ± std when > 1)")
    p.add_argument("--quick", action="store_true", help="2-epoch smoke run: --set " + " --set ".join(QUICK_SETS))
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override, as in kdflow run")
    p.add_argument(
        "--keep-homes",
        metavar="DIR",
        help="keep every run's home (MLflow store, pipeline root, log) "
        "under DIR, e.g. for bench_champion.py --home; default: temporary, deleted",
    )
    p.add_argument(
        "--reuse-store",
        action="store_true",
        help="run each config's repeats in one home: run 1 creates the MLflow store, later runs reuse it "
        "(reported apart, as '<config>, store reused'); needs --repeats 2 or more",
    )
    p.add_argument("--timeout", type=float, help="give up on a run after this many seconds")
    p.add_argument("--out", default=str(RESULTS / "pipeline.json"))
    p.add_argument("--parse-log", metavar="LOG", help="only analyse this existing run log and print the result")
    args = p.parse_args(argv)

    if args.parse_log:
        print(json.dumps(analyse(parse_log(Path(args.parse_log).read_text())), indent=2))
        return 0
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.reuse_store and args.repeats < 2:
        p.error(f"--reuse-store needs --repeats 2 or more (run 1 creates the store), got {args.repeats}")
    configs = [_config_arg(c.strip()) for c in args.configs.split(",") if c.strip()]
    sets = (QUICK_SETS if args.quick else []) + args.sets
    keep = Path(args.keep_homes).resolve() if args.keep_homes else None
    scratch = Path(tempfile.mkdtemp(prefix="kdflow-bench-pipeline-"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, path in configs:
            runs = []
            for k in range(args.repeats):
                home = (keep or scratch) / f"{stamp}-{name}-r{0 if args.reuse_store else k}"
                home.parent.mkdir(parents=True, exist_ok=True)
                print(f"{name} run {k + 1}/{args.repeats}: kdflow run --home {home} ...", file=sys.stderr)
                r = run_pipeline(path, home, sets, args.timeout, reuse=args.reuse_store)
                if keep is None:
                    r["home"] = r["log"] = None
                runs.append(r)
                if "error" in r:
                    print(f"  wall {r['wall_s']:.1f} s; timing lines unusable: {r['error']}", file=sys.stderr)
                else:
                    print(
                        f"  wall {r['wall_s']:.1f} s, compute on critical path {r['critical_compute_s']:.1f} s, "
                        f"overhead {r['overhead_s']:.1f} s ({100 * r['overhead_share']:.1f}%), "
                        f"other processes {r['other_cores'] or 0:.1f} cores",
                        file=sys.stderr,
                    )
            config = display_path(path) if path else "(built-in default)"
            groups = [(name, runs[:1]), (f"{name}, store reused", runs[1:])] if args.reuse_store else [(name, runs)]
            for label, group in groups:
                results[label] = {"config": config, "runs": group, "summary": summarise(group)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    md = tables(results)
    floor = import_floor()
    targets = []  # the default run's, first on a new store, then (with --reuse-store) on the reused one
    for label in ("default", "default, store reused"):
        if label in results and results[label]["summary"].get("overhead_share"):
            summary = results[label]["summary"]
            share, compute = summary["overhead_share"]["mean"], summary["critical_compute_s"]["mean"]
            targets.append(
                {
                    "metric": f"overhead share of the wall time: {label}",
                    "threshold": TARGET_OVERHEAD_SHARE,
                    "value": share,
                    "met": share <= TARGET_OVERHEAD_SHARE,
                    # overhead / (overhead + compute) <= t  <=>  overhead <= compute * t / (1 - t)
                    "overhead_budget_s": compute * TARGET_OVERHEAD_SHARE / (1 - TARGET_OVERHEAD_SHARE),
                }
            )
    print(f"\nLocal pipeline (kdflow run), {args.repeats} run(s) per config{' (quick)' if args.quick else ''}\n")
    print(md)
    print("\nimport floor (median of 3 bare processes): " + ", ".join(f"`{k}` {v:.2f} s" for k, v in floor.items()))
    for t in targets:
        print(
            f"\n{t['metric']}: {100 * t['value']:.1f}% "
            f"(target ≤ {100 * TARGET_OVERHEAD_SHARE:.0f}%: {'met' if t['met'] else 'not met'}); "
            f"the target allows {t['overhead_budget_s']:.2f} s of overhead on this compute"
        )
    busy = [
        f"{n} run {i + 1} ({r['other_cores']:.1f})"
        for n, res in results.items()
        for i, r in enumerate(res["runs"])
        if (r.get("other_cores") or 0) > BUSY_CORES
    ]
    warning = (
        (
            f"WARNING: other processes kept cores busy during {', '.join(busy)} (average cores taken): "
            "timings are disturbed; rerun on an idle machine."
        )
        if busy
        else ""
    )
    if warning:
        print(f"\n{warning}")
    write_json(
        Path(args.out),
        {
            "benchmark": "pipeline",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine(),
            "quick": args.quick,
            "sets": sets,
            "repeats": args.repeats,
            "local_parallelism": LOCAL_PARALLELISM,
            "results": results,
            "target": targets[0] if targets else None,
            "targets": targets,
            "import_floor_s": floor,
            "markdown": md,
            "warning": warning,
        },
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
