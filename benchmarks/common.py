"""Shared set-up for the speed benchmarks: one task, one teacher, one student recipe, one way to measure.

Every side of every benchmark (kdflow, a plain PyTorch loop, torchdistill) trains the same student from the same
initial weights (same seed) against the same frozen teacher on the same MNIST -> USPS tensors, built by kdflow's
own data preparation from `benchmarks/speed_mnist_to_usps.yaml` (the shipped MNIST -> USPS config as it was
benchmarked). Only the training machinery differs. Timing, memory and
test accuracy are measured here, outside the code being compared, so no side measures itself.

Each (side, seed) run happens in a fresh subprocess (`run_worker`), so peak-memory numbers do not include what an
earlier run left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdflow import data, models
from kdflow.config import Config, LossConfig, TrainConfig, load_config
from kdflow.data import ImageSet
from kdflow.engine.device import resolve_device, seed_everything
from kdflow.engine.loop import fit
from kdflow.evaluate import accuracy, predict

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CACHE = BENCH / ".cache"  # prepared tensors and the trained teacher; git-ignored, safe to delete
RESULTS = BENCH / "results"
DEFAULT_CONFIG = BENCH / "speed_mnist_to_usps.yaml"  # the fixed recipe the speed runs were measured with
QUICK_EPOCHS = 2


def default_threads() -> int:
    """The cores this process may run on (2 on the reference machine): every side gets the same count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------------ task


@dataclass
class Task:
    """The target task as kdflow prepares it: uint8 splits, the manifest's normaliser, shapes."""

    cfg: Config
    data_dir: Path
    manifest: dict
    normalizer: data.Normalizer
    train: ImageSet
    val: ImageSet
    test: ImageSet
    in_channels: int
    num_classes: int
    image_size: int


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_cfg(config_path: str | Path = DEFAULT_CONFIG) -> Config:
    """The run config with its data paths made absolute (they are written relative to the project root)."""
    return load_config(config_path).with_local_paths(REPO)


def prepare_task(cfg: Config) -> Task:
    """kdflow's `data.prepare` output for this config, cached under benchmarks/.cache/data/<key>."""
    out = CACHE / "data" / _key(cfg.data.model_dump(mode="json"), cfg.seed)
    if not (out / "manifest.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="prep-", dir=CACHE))
        data.prepare(cfg.data, cfg.seed, tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    return open_task(cfg, out)


def open_task(cfg: Config, data_dir: str | Path) -> Task:
    """The target task from an already prepared directory (workers get the parent's, so every run of one
    benchmark reads the same files whatever happens to the cache meanwhile)."""
    out = Path(data_dir)
    manifest = data.read_manifest(out)
    target = manifest["tasks"]["target"]
    splits = {s: ImageSet(*data.load_split(out, "target", s)) for s in data.SPLITS}
    return Task(
        cfg=cfg,
        data_dir=out,
        manifest=manifest,
        normalizer=data.Normalizer.from_manifest(manifest),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        in_channels=target["shape"][0],
        num_classes=target["num_classes"],
        image_size=target["shape"][-1],
    )


# --------------------------------------------------------------------------------------------------- teacher


def teacher_recipe(cfg: Config, quick: bool) -> dict[str, Any]:
    """The pipeline's teacher recipe (pretrain on MNIST, new head, fine-tune on USPS); `quick` shortens it."""
    t = cfg.teacher
    pre, fine = t.pretrain, t.finetune
    if quick:
        pre, fine = pre.model_copy(update={"epochs": 1}), fine.model_copy(update={"epochs": 2})
    return {"arch": t.arch, "arch_kwargs": t.arch_kwargs, "pretrain": pre, "finetune": fine}


def load_teacher(task: Task, quick: bool = False, device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """The fine-tuned teacher, trained once with kdflow's `fit` exactly as the pipeline's train_teacher step does
    it, then cached as a state dict. Returns (teacher in eval mode on the CPU, info with its accuracies and the
    cache `file`, which workers open with `read_teacher`)."""
    cfg = task.cfg
    recipe = teacher_recipe(cfg, quick)
    dumped = {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in recipe.items()}
    path = CACHE / f"teacher-{_key(task.manifest['content_hash'], dumped, cfg.seed, quick)}.pt"
    if path.is_file():
        return read_teacher(path, task)

    device = device or resolve_device("auto")
    src = {s: ImageSet(*data.load_split(task.data_dir, "source", s)) for s in ("train", "val")}
    seed_everything(cfg.seed)
    source_classes = task.manifest["tasks"]["source"]["num_classes"]
    net = models.build(recipe["arch"], task.in_channels, source_classes, **recipe["arch_kwargs"])
    t0 = time.perf_counter()
    fit(net, src["train"], src["val"], recipe["pretrain"], task.normalizer, seed=cfg.seed, device=device)
    models.replace_head(net, task.num_classes, recipe["arch"])
    fit(net, task.train, task.val, recipe["finetune"], task.normalizer, seed=cfg.seed + 1, device=device)
    net = net.cpu().eval()
    info = {
        "arch": recipe["arch"],
        "arch_kwargs": recipe["arch_kwargs"],
        "params": models.count_params(net),
        "val_acc": test_accuracy(net, task.val, task.normalizer),
        "test_acc": test_accuracy(net, task.test, task.normalizer),
        "train_s": round(time.perf_counter() - t0, 1),
        "trained_on": str(device),
        "quick": quick,
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": net.state_dict(), "info": json.dumps(info)}, tmp)
    tmp.replace(path)
    return read_teacher(path, task)


def read_teacher(path: str | Path, task: Task) -> tuple[nn.Module, dict]:
    """A cached teacher file: (network in eval mode on the CPU, info including `file`)."""
    blob = torch.load(path, weights_only=True)
    info = json.loads(blob["info"])
    net = models.build(info["arch"], task.in_channels, task.num_classes, **info["arch_kwargs"])
    net.load_state_dict(blob["state_dict"])
    return net.eval(), {**info, "file": display_path(path)}


# ---------------------------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """One distillation run's hyper-parameters: identical on every side of a comparison."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    augment: str
    temperature: float
    alpha: float
    student_arch: str
    student_kwargs: tuple[tuple[str, Any], ...]

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer="sgd",
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            augment=self.augment,
        )

    def loss_config(self) -> LossConfig:
        return LossConfig(name="kd", kind="kd", temperature=self.temperature, alpha=self.alpha)

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch_size)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["student_kwargs"] = dict(self.student_kwargs)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Recipe:
        return cls(**{**d, "student_kwargs": tuple(sorted(d["student_kwargs"].items()))})


def default_recipe(cfg: Config, epochs: int | None = None, augment: str | None = None) -> Recipe:
    """The config's distillation settings: its `train` section, its first `kind: kd` loss on the target transfer
    set, and its first fresh-architecture student (`cnn8` in mnist_to_usps.yaml; pruned students need the
    pruning step and are not part of the speed comparison)."""
    tr = cfg.distill.train
    kd = next((l for l in cfg.distill.losses if l.kind == "kd" and l.transfer == "target"), None)
    if kd is None:
        raise ValueError("the config lists no `kind: kd` loss with `transfer: target` to benchmark")
    student = next((s for s in cfg.distill.students if s.arch is not None), None)
    if student is None:
        raise ValueError("the config lists no student with `arch:` (only pruned ones) to benchmark")
    return Recipe(
        epochs=tr.epochs if epochs is None else epochs,
        batch_size=tr.batch_size,
        lr=tr.lr,
        momentum=tr.momentum,
        weight_decay=tr.weight_decay,
        augment=tr.augment if augment is None else augment,
        temperature=kd.temperature,
        alpha=kd.alpha,
        student_arch=student.arch,
        student_kwargs=tuple(sorted(student.arch_kwargs.items())),
    )


def build_student(task: Task, recipe: Recipe, seed: int) -> nn.Module:
    """The student's initial weights depend only on the seed: every side starts from the same network."""
    seed_everything(seed)
    return models.build(recipe.student_arch, task.in_channels, task.num_classes, **dict(recipe.student_kwargs))


def test_accuracy(model: nn.Module, split: ImageSet, normalizer: data.Normalizer) -> float:
    """Top-1 on a split, computed the same way for every side (eval mode, kdflow's batched predict)."""
    return accuracy(predict(model, split.x, normalizer), split.y)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed precision kdflow's fit uses on this device (bf16 on GPUs that have it), so the baselines can
    train at the same precision. None = fp32 (CPU, or older GPUs, where kdflow uses fp16 + a GradScaler that the
    baselines do not replicate)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# --------------------------------------------------------------------------------------------------- measure


def warm_up(device: torch.device) -> None:
    """One throwaway SGD step on a tiny network before any timed run. A fresh process imports a large part of torch
    (dynamo, sympy, ...) lazily on its first optimiser step, several seconds on a small machine: without this, the
    side whose imports happen not to pull those modules in earlier would pay for them inside its timed section."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).to(device)
    x = torch.randn(4, 1, 8, 8, device=device)
    net(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
    loss = nn.functional.cross_entropy(net(x), torch.zeros(4, dtype=torch.long, device=device))
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        net.eval()(x)
    sync(device)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak memory of the measured phase. CPU: the process's resident-set high-water mark, reset at the start
    (Linux `clear_refs` = 5) so it covers only training; elsewhere getrusage's lifetime peak. CUDA: peak bytes
    allocated by torch. DataLoader worker processes are not counted (run with workers=0 for complete numbers)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        self.rss_before_kib = _proc_status_kib("VmRSS") or 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_before = torch.cuda.memory_allocated(self.device)

    def stop(self) -> dict[str, float | bool]:
        peak_kib = _proc_status_kib("VmHWM") if self.hwm_reset else None
        if peak_kib is None:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        out: dict[str, float | bool] = {
            "peak_rss_mb": peak_kib / 1024,
            "train_rss_delta_mb": max(0, peak_kib - self.rss_before_kib) / 1024,
            "rss_peak_is_training_only": self.hwm_reset,
        }
        if self.device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["cuda_delta_mb"] = (torch.cuda.max_memory_allocated(self.device) - self.cuda_before) / 2**20
        return out


def machine_cpu_s() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux /proc/stat; None elsewhere). The change
    over a run minus the run's own CPU time = what other processes took meanwhile."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    """Wall time, this process's CPU time (all threads) and the cores other processes kept busy meanwhile
    (`other_cores`: 0 on an idle machine; above ~0.3 the timings are disturbed)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self.machine0, self.cpu0, self.t0 = machine_cpu_s(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.wall_s = time.perf_counter() - self.t0
        self.cpu_s = time.process_time() - self.cpu0
        machine1 = machine_cpu_s()
        self.other_cores = (
            max(0.0, (machine1 - self.machine0 - self.cpu_s) / self.wall_s) if machine1 is not None else None
        )

    def as_dict(self) -> dict[str, float | None]:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "other_cores": self.other_cores}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(script: Path, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run `script --worker <spec>` in a fresh Python and return the JSON it writes; its stderr passes through.
    The process's own start-up (interpreter, imports, data and teacher loading) is timed too, as `process_s`."""
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker", json.dumps(spec), "--worker-out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=timeout)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}) for {spec}:\n{proc.stdout[-2000:]}")
        result = json.loads(out.read_text())
    result["process_s"] = elapsed
    return result


BUSY_CORES = 0.3  # other processes' average core use during a run above which its timing is flagged


def run_measured(script: Path, spec: dict[str, Any], retries: int) -> dict[str, Any]:
    """`run_worker`, repeated up to `retries` more times while other processes disturbed the run (`other_cores`
    above BUSY_CORES); keeps the least disturbed attempt. Training is deterministic for a given seed and thread
    count, so a repeat changes only the timing."""
    best = None
    for attempt in range(1 + max(0, retries)):
        r = run_worker(script, spec)
        r["attempt"] = attempt + 1
        if best is None or (r.get("other_cores") or 0) < (best.get("other_cores") or 0):
            best = r
        if (best.get("other_cores") or 0) <= BUSY_CORES:
            break
    return best


# --------------------------------------------------------------------------------------------------- report


def busy_warning(runs: list[dict], label) -> str:
    """A warning naming the runs that shared the machine with other work, or '' when none did."""
    busy = [f"{label(r)} ({r['other_cores']:.1f})" for r in runs if (r.get("other_cores") or 0) > BUSY_CORES]
    if not busy:
        return ""
    return (
        f"WARNING: other processes kept cores busy during {len(busy)} of {len(runs)} runs (average cores taken): "
        f"{', '.join(busy)}. Their timings are disturbed; rerun on an idle machine."
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 1, scale: float = 1.0) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores_available": default_threads(),
        "torch_threads": threads,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def display_path(path: str | Path) -> str:
    """A path relative to the project root when it lies inside it (results files stay machine-independent)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write (results/*.tmp is git-ignored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
