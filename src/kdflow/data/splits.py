"""Transfer set-ups and deterministic hashed splits.

A transfer set-up turns one or two sources into a *source task* (teacher pretraining, and the optional source
transfer set) and a *target task* (fine-tuning, distillation, evaluation). Each sample's split is decided by a
hash of its pixels and the seed, not by its position: the same image always lands in the same split, duplicates
cannot leak across splits, and reordering a dataset changes nothing.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from kdflow.config import DataConfig
from kdflow.data.sources import ImageSet, load_source
from kdflow.errors import DataError


def sample_hashes(x: torch.Tensor, salt: str) -> np.ndarray:
    """One uniform number in [0, 1) per image, from a hash of its pixels and `salt`."""
    flat = x.reshape(len(x), -1).numpy()
    out = np.empty(len(x), dtype=np.float64)
    prefix = salt.encode()
    for i, row in enumerate(flat):
        digest = hashlib.blake2b(prefix + row.tobytes(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2**64
    return out


def hashed_split(x: torch.Tensor, fractions: dict[str, float], salt: str) -> dict[str, torch.Tensor]:
    """Partition indices by hash into named parts of (about) the given fractions; sorted indices per part."""
    u = sample_hashes(x, salt)
    edges = np.cumsum(list(fractions.values()))
    edges[-1] = 1.0 + 1e-12
    part = np.searchsorted(edges, u, side="right")
    return {name: torch.from_numpy(np.flatnonzero(part == i)) for i, name in enumerate(fractions)}


def apply_shift(x: torch.Tensor, shift: str) -> torch.Tensor:
    """The domain shift of a `domain_shift` set-up, on uint8 (N, C, H, W)."""
    if shift == "hflip":
        return x.flip(-1)
    if shift == "vflip":
        return x.flip(-2)
    if shift == "rot90":
        return x.rot90(1, dims=(-2, -1))
    if shift == "invert":
        return 255 - x
    raise DataError(f"unknown shift {shift!r}")


def conform(s: ImageSet, size: int, channels: int) -> ImageSet:
    """Resize to size×size and convert to `channels` channels so two sources can share one network."""
    x = s.x
    if x.shape[1] != channels:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return ImageSet(x.contiguous(), s.y, s.classes)


def select_classes(s: ImageSet, keep: list[int]) -> ImageSet:
    """Keep only classes `keep`, relabelled 0..len(keep)-1 in that order."""
    n = len(s.classes)
    bad = [c for c in keep if not 0 <= c < n]
    if bad:
        raise DataError(f"class indices {bad} out of range for a dataset with {n} classes")
    remap = torch.full((n,), -1, dtype=torch.int64)
    remap[torch.tensor(keep)] = torch.arange(len(keep))
    mask = remap[s.y] >= 0
    return ImageSet(s.x[mask], remap[s.y[mask]], [s.classes[c] for c in keep])


def limit_per_class(s: ImageSet, k: int, salt: str) -> ImageSet:
    """The first `k` samples of each class in hash order: a few-shot target training set, deterministic."""
    order = np.argsort(sample_hashes(s.x, salt), kind="stable")
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        c = int(s.y[i])
        if taken.get(c, 0) < k:
            taken[c] = taken.get(c, 0) + 1
            keep.append(i)
    return s.subset(torch.tensor(sorted(keep), dtype=torch.int64))


# ----------------------------------------------------------------------------------------------- the set-ups


def build_tasks(cfg: DataConfig, seed: int, origins: dict[str, dict] | None = None) -> tuple[ImageSet, ImageSet]:
    """(source task, target task) for the configured transfer set-up, before splitting; `origins` receives the
    lineage of each s3:// source read (`load_s3`)."""
    src = load_source(cfg.source, cfg, origins)
    if cfg.setup == "cross_dataset":
        tgt = load_source(cfg.target, cfg, origins)
        size = cfg.image_size or tgt.x.shape[-1]
        channels = cfg.channels or tgt.x.shape[1]
        return conform(src, size, channels), conform(tgt, size, channels)
    if cfg.image_size or cfg.channels:
        src = conform(src, cfg.image_size or src.x.shape[-1], cfg.channels or src.x.shape[1])
    if cfg.setup == "class_split":
        n = len(src.classes)
        s_cls = cfg.source_classes if cfg.source_classes is not None else list(range(n // 2))
        t_cls = cfg.target_classes if cfg.target_classes is not None else [c for c in range(n) if c not in s_cls]
        both = sorted(set(s_cls) & set(t_cls))
        if both:
            raise DataError(f"data.source_classes {s_cls} and data.target_classes {t_cls} overlap: {both}")
        if not s_cls or not t_cls:
            raise DataError("data.source_classes and data.target_classes must each name at least one class")
        return select_classes(src, s_cls), select_classes(src, t_cls)
    # domain_shift: disjoint halves of one dataset; the target half is transformed
    halves = hashed_split(src.x, {"source": cfg.source_fraction, "target": 1 - cfg.source_fraction}, f"pool/{seed}")
    tgt = src.subset(halves["target"])
    return src.subset(halves["source"]), ImageSet(apply_shift(tgt.x, cfg.shift).contiguous(), tgt.y, tgt.classes)


def split_task(s: ImageSet, cfg: DataConfig, task: str, seed: int) -> dict[str, ImageSet]:
    fractions = {"train": 1 - cfg.val_fraction - cfg.test_fraction, "val": cfg.val_fraction, "test": cfg.test_fraction}
    parts = {k: s.subset(v) for k, v in hashed_split(s.x, fractions, f"{task}/{seed}").items()}
    if task == "source" and cfg.max_source_samples:
        parts["train"] = parts["train"].subset(torch.arange(min(cfg.max_source_samples, len(parts["train"].x))))
    if task == "target" and cfg.target_samples_per_class:
        parts["train"] = limit_per_class(parts["train"], cfg.target_samples_per_class, f"few/{seed}")
    val_cap = cfg.target_val_samples_per_class
    if val_cap == "train":
        val_cap = cfg.target_samples_per_class
    if task == "target" and val_cap:
        parts["val"] = limit_per_class(parts["val"], val_cap, f"few-val/{seed}")
    for name, part in parts.items():
        if len(part.x) == 0:
            raise DataError(f"{task} {name} split is empty: the data set is too small for the configured fractions")
    return parts
