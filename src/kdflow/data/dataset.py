"""A prepared dataset: both tasks split, written as weights-only tensor files plus a manifest (classes, shapes,
counts, normalisation, content hash, and the URI, ETags and SHA-256 of s3:// sources), and read back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kdflow.config import DataConfig
from kdflow.data.sources import ImageSet
from kdflow.data.splits import build_tasks, split_task
from kdflow.errors import DataError

SPLITS = ("train", "val", "test")
TASKS = ("source", "target")


def tensor_hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def prepare(cfg: DataConfig, seed: int, out_dir: str | Path) -> dict:
    """Build both tasks, split them, write `<task>_<split>.pt` files and `manifest.json`; return the manifest."""
    origins: dict[str, dict] = {}  # s3:// lineage of the very copies read (another run may refresh the cache)
    (source, target), splits = build_checked(cfg, seed, origins)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_x = splits["source"]["train"].x.float() / 255.0  # normalisation the teacher first learns with
    mean = train_x.mean(dim=(0, 2, 3)).tolist()
    std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()

    manifest: dict = {"setup": cfg.setup, "seed": seed, "normalization": {"mean": mean, "std": std}, "tasks": {}}
    hashes = []
    for task in TASKS:
        ds = source if task == "source" else target
        spec = cfg.source if task == "source" or cfg.setup != "cross_dataset" else cfg.target
        manifest["tasks"][task] = {
            "spec": spec,
            "classes": ds.classes,
            "num_classes": len(ds.classes),
            "shape": list(ds.x.shape[1:]),
            "counts": {name: len(p.x) for name, p in splits[task].items()},
        }
        origin = origins.get(spec)
        if origin is not None:
            manifest["tasks"][task]["origin"] = origin
        for name, part in splits[task].items():
            torch.save({"x": part.x, "y": part.y}, out / f"{task}_{name}.pt")
            hashes.append(tensor_hash(part.x, part.y))
    manifest["content_hash"] = hashlib.sha256("".join(hashes).encode()).hexdigest()
    manifest["target_test_hash"] = hashes[TASKS.index("target") * 3 + SPLITS.index("test")]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def build_checked(
    cfg: DataConfig, seed: int, origins: dict[str, dict] | None = None
) -> tuple[tuple[ImageSet, ImageSet], dict[str, dict[str, ImageSet]]]:
    """((source task, target task), their splits), every check data prep makes passed: each file readable,
    labels in range, at least 2 classes per task and per training split, no split empty; else a DataError."""
    source, target = build_tasks(cfg, seed, origins)
    for task, ds in (("source", source), ("target", target)):
        check_labels(
            ds, f"{task} task ({cfg.source if task == 'source' or cfg.setup != 'cross_dataset' else cfg.target})"
        )
    splits = {"source": split_task(source, cfg, "source", seed), "target": split_task(target, cfg, "target", seed)}
    for task, parts in splits.items():
        present = len(torch.unique(parts["train"].y))
        if present < 2:
            raise DataError(f"{task} train split holds {present} class: training needs images of at least 2 classes")
    return (source, target), splits


def check(cfg: DataConfig, seed: int) -> None:
    """Read both tasks and make data prep's checks without writing anything: `kdflow run` calls this before it
    starts the pipeline, so bad data fails in seconds with one line, not in a pipeline step. s3:// and
    torchvision sources are fetched into their cache under `data.root`, where data prep then finds them."""
    build_checked(cfg, seed)


# ------------------------------------------------------------------------------------------ reading it back


def check_labels(ds: ImageSet, what: str) -> None:
    """Labels within [0, number of classes) and at least 2 classes with images, else a DataError naming the
    task, its source and the bad value; checked in data prep, before any training."""
    if len(ds.y) == 0:
        raise DataError(f"{what}: no images")
    n = len(ds.classes) if ds.classes else int(ds.y.max()) + 1
    low, high = int(ds.y.min()), int(ds.y.max())
    if low < 0 or high >= n:
        bad = low if low < 0 else high
        raise DataError(f"{what}: label {bad} is out of range for its {n} classes (labels must be 0 to {n - 1})")
    present = torch.unique(ds.y).tolist()
    if len(present) < 2:
        name = ds.classes[present[0]] if ds.classes else present[0]
        raise DataError(f"{what}: only one class ({name!r}) has images; classification needs at least 2")


def read_manifest(data_dir: str | Path) -> dict:
    return json.loads((Path(data_dir) / "manifest.json").read_text())


def load_split(data_dir: str | Path, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, int64 labels) of one split; weights-only, so no code is ever unpickled."""
    blob = torch.load(Path(data_dir) / f"{task}_{split}.pt", weights_only=True)
    return blob["x"], blob["y"]


class Normalizer(torch.nn.Module):
    """uint8 (N, C, H, W) → float, normalised with the manifest's mean/std; runs on the batch's device."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    @classmethod
    def from_manifest(cls, manifest: dict) -> Normalizer:
        return cls(manifest["normalization"]["mean"], manifest["normalization"]["std"])


def load_imageset(data_dir: str | Path, task: str, split: str) -> ImageSet:
    """One split as an ImageSet (no class names: the manifest has them)."""
    return ImageSet(*load_split(data_dir, task, split))
