"""Data sources, transfer set-ups and deterministic hashed splits.

Every source is read into one uint8 tensor of images (N, C, H, W) and int64 labels. A transfer set-up turns one or
two sources into a *source task* (teacher pretraining, and the optional source transfer set) and a *target task*
(fine-tuning, distillation, evaluation). Each sample's split is decided by a hash of its pixels and the seed, not
by its position: the same image always lands in the same split, duplicates cannot leak across splits, and
reordering a dataset changes nothing. The result is a directory of weights-only-loadable tensor files plus a
manifest (classes, shapes, counts, normalisation, content hash, and the URI, ETags and SHA-256 of s3://
sources).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdflow.config import DataConfig

SPLITS = ("train", "val", "test")
TASKS = ("source", "target")
TORCHVISION_SOURCES = ("mnist", "fashion-mnist", "cifar10", "cifar100")


class DataError(ValueError):
    """A data source or set-up that cannot be built; the message names the bad value."""


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W), labels as int64 (N,), and the class names the labels index."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise DataError(f"{len(self.x)} images but {len(self.y)} labels")

    def subset(self, idx: torch.Tensor) -> ImageSet:
        return ImageSet(self.x[idx], self.y[idx], self.classes)


# ---------------------------------------------------------------------------------------------------- readers


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST's format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes; {ndim} dimensions need {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if (len(raw) - header) % np.dtype(dtype).itemsize:
        raise DataError(f"{path}: header says {shape} but the payload is {len(raw) - header} bytes")
    data = np.frombuffer(raw, dtype=dtype, offset=header)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {data.size} values")
    return data.reshape(shape)


def load_mnist_idx(directory: str | Path) -> ImageSet:
    """All IDX image/label pairs found in `directory` (train and/or t10k), concatenated."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise DataError(f"mnist-idx directory not found: {d}")
    xs, ys = [], []
    for prefix in ("train", "t10k"):
        imgs = sorted(d.glob(f"{prefix}-images-idx3-ubyte*"))
        labs = sorted(d.glob(f"{prefix}-labels-idx1-ubyte*"))
        if imgs and labs:
            x, y = read_idx(imgs[0]), read_idx(labs[0])
            if len(x) != len(y):
                raise DataError(f"{imgs[0]} has {len(x)} images but {labs[0]} has {len(y)} labels")
            xs.append(x)
            ys.append(y)
    if not xs:
        raise DataError(f"no '*-images-idx3-ubyte[.gz]' + '*-labels-idx1-ubyte[.gz]' pair in {d}")
    x = torch.from_numpy(np.concatenate(xs)).unsqueeze(1).contiguous()
    y = torch.from_numpy(np.concatenate(ys).astype(np.int64))
    return ImageSet(x, y, [str(i) for i in range(10)])


def load_usps(directory: str | Path) -> ImageSet:
    """USPS as torchvision reads it (LIBSVM bz2 files `usps.bz2` / `usps.t.bz2`), whichever are present."""
    from torchvision.datasets import USPS

    d = Path(directory).expanduser()
    present = [train for train, name in ((True, "usps.bz2"), (False, "usps.t.bz2")) if (d / name).is_file()]
    if not present:
        raise DataError(f"no usps.bz2 or usps.t.bz2 in {d}")
    xs, ys = [], []
    for train in present:
        ds = USPS(str(d), train=train, download=False)
        xs.append(np.asarray(ds.data, dtype=np.uint8))
        ys.append(np.asarray(ds.targets, dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).unsqueeze(1).contiguous()
    return ImageSet(x, torch.from_numpy(np.concatenate(ys)), [str(i) for i in range(10)])


def read_usps_libsvm(path: str | Path) -> ImageSet:
    """A dependency-free reader of the same LIBSVM file, used to cross-check torchvision's."""
    with bz2.open(path, "rt") as f:
        rows = [line.split() for line in f if line.strip()]
    y = torch.tensor([int(float(r[0])) - 1 for r in rows])
    vals = np.zeros((len(rows), 256), dtype=np.float32)
    for i, r in enumerate(rows):
        for item in r[1:]:
            k, v = item.split(":")
            vals[i, int(k) - 1] = float(v)
    x = torch.from_numpy(((vals + 1) / 2 * 255).astype(np.uint8)).view(-1, 1, 16, 16)
    return ImageSet(x, y, [str(i) for i in range(10)])


def load_digits_set() -> ImageSet:
    """scikit-learn's bundled 8×8 digits (1,797 images, 17 grey levels 0–16 spread over 0–255): the offline default."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8)).unsqueeze(1).contiguous()
    return ImageSet(x, torch.from_numpy(d.target.astype(np.int64)), [str(c) for c in d.target_names])


def load_torchvision(name: str, root: str | Path, download: bool) -> ImageSet:
    """A torchvision dataset by name, train and test parts pooled (kdflow makes its own splits)."""
    from torchvision import datasets

    cls = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]
    root = Path(root).expanduser() / name
    xs, ys, classes = [], [], None
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as err:
            raise DataError(f"cannot load torchvision dataset {name!r} from {root}: {err}") from None
        data = torch.as_tensor(np.asarray(ds.data))
        xs.append(data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2))
        ys.append(torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))
        classes = list(ds.classes)
    return ImageSet(torch.cat(xs).contiguous(), torch.cat(ys), [str(c) for c in classes])


def load_imagefolder(path: str | Path, image_size: int | None, channels: int | None) -> ImageSet:
    """An ImageFolder tree (`class/image.png`), decoded once and resized to `image_size`."""
    from torchvision.datasets import ImageFolder

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder path not found: {root}")
    if image_size is None:
        raise DataError(f"imagefolder:{root} needs data.image_size (images come in any size)")
    mode = "L" if channels == 1 else "RGB"
    ds = ImageFolder(str(root), loader=lambda p: _open_image(p, mode, image_size))
    if len(ds) == 0:
        raise DataError(f"imagefolder {root} holds no images")
    x = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()) for img, _ in ds])
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return ImageSet(x.contiguous(), torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def _open_image(path: str, mode: str, size: int):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert(mode).resize((size, size), Image.BILINEAR)


def load_s3(uri: str, cfg: DataConfig, origins: dict[str, dict] | None = None) -> ImageSet:
    """An ImageFolder tree (`s3://bucket/prefix/`) or archive of one (`s3://bucket/data.tar.gz`, `.zip`), fetched
    into the cache under `data.root` (see `kdflow.s3`); with `data.download: false` only the cache is used.
    `origins[uri]` receives the lineage (URI, ETags, content hash) of exactly the copy the images come from."""
    from kdflow import s3

    if cfg.image_size is None:
        raise DataError(f"{uri} needs data.image_size (images come in any size)")
    fetched = s3.fetch(uri, s3_cache_root(cfg), offline=not cfg.download)
    if origins is not None:
        origins[uri] = fetched.lineage
    try:
        return load_imagefolder(fetched.root, cfg.image_size, cfg.channels)
    except (DataError, OSError) as err:  # OSError: PIL cannot decode an image
        raise DataError(f"{uri} (cached in {fetched.root}): {err}") from None


def s3_cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser() / "s3"


def load_source(spec: str, cfg: DataConfig, origins: dict[str, dict] | None = None) -> ImageSet:
    """Resolve a source string: `digits`, `mnist-idx:<dir>`, `usps:<dir>`, `imagefolder:<dir>`, `s3://<bucket>/...`
    or a torchvision name (`mnist`, `fashion-mnist`, `cifar10`, `cifar100`)."""
    if spec.startswith("s3://"):
        return load_s3(spec, cfg, origins)
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return load_digits_set()
    if kind == "mnist-idx" and arg:
        return load_mnist_idx(arg)
    if kind == "usps" and arg:
        return load_usps(arg)
    if kind == "imagefolder" and arg:
        return load_imagefolder(arg, cfg.image_size, cfg.channels)
    if spec in TORCHVISION_SOURCES:
        return load_torchvision(spec, cfg.root, cfg.download)
    raise DataError(
        f"unknown data source {spec!r}: use digits, mnist-idx:<dir>, usps:<dir>, imagefolder:<dir>, "
        f"s3://<bucket>/<prefix>/, s3://<bucket>/<archive>.tar.gz|.zip or one of {', '.join(TORCHVISION_SOURCES)}"
    )


# ----------------------------------------------------------------------------------------- hashing and splits


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
    for name, part in parts.items():
        if len(part.x) == 0:
            raise DataError(f"{task} {name} split is empty: the data set is too small for the configured fractions")
    return parts


def tensor_hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def prepare(cfg: DataConfig, seed: int, out_dir: str | Path) -> dict:
    """Build both tasks, split them, write `<task>_<split>.pt` files and `manifest.json`; return the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    origins: dict[str, dict] = {}  # s3:// lineage of the very copies read (another run may refresh the cache)
    source, target = build_tasks(cfg, seed, origins)
    splits = {"source": split_task(source, cfg, "source", seed), "target": split_task(target, cfg, "target", seed)}

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


# ------------------------------------------------------------------------------------------ reading it back


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
