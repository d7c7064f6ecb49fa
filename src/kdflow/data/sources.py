"""Data sources: every reader returns one `ImageSet`, uint8 images (N, C, H, W) and int64 labels.

`load_source` resolves a source string (`digits`, `mnist-idx:<dir>`, `usps:<dir>`, `imagefolder:<dir>`, a
torchvision name, or `s3://...` through `kdflow.data.s3`).
"""

from __future__ import annotations

import bz2
import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# (the torchvision names live in kdflow.config, which checks source strings without importing torch)
from kdflow.config import TORCHVISION_SOURCES, DataConfig, unknown_source
from kdflow.errors import DataError


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W), labels as int64 (N,), and the class names the labels index: a source as read,
    a task, or one split of it held as tensors (on any device)."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise DataError(f"{len(self.x)} images but {len(self.y)} labels")

    def subset(self, idx: torch.Tensor) -> ImageSet:
        return ImageSet(self.x[idx], self.y[idx], self.classes)

    def to(self, device: torch.device) -> ImageSet:
        """The same set on `device` (pinned, non-blocking copies to a GPU)."""
        pin = device.type == "cuda"
        x, y = (self.x.pin_memory(), self.y.pin_memory()) if pin else (self.x, self.y)
        return ImageSet(x.to(device, non_blocking=pin), y.to(device, non_blocking=pin), self.classes)

    def __len__(self) -> int:
        return len(self.y)


# ---------------------------------------------------------------------------------------------------- readers


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST's format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as err:  # a cut or corrupt download
        raise DataError(f"{path}: unreadable ({type(err).__name__}: {err or 'truncated'})") from None
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
        try:
            ds = USPS(str(d), train=train, download=False)
        except (EOFError, OSError, ValueError, IndexError) as err:  # a cut bz2 file or a malformed line
            name = "usps.bz2" if train else "usps.t.bz2"
            raise DataError(f"{d / name}: unreadable ({type(err).__name__}: {err or 'truncated'})") from None
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
    try:  # (permanent errors: a DataError, never retried)
        ds = ImageFolder(str(root), loader=lambda p: _open_image(p, mode, image_size))
        if len(ds) == 0:
            raise DataError(f"imagefolder {root} holds no images")
        images = [torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()) for img, _ in ds]
    except FileNotFoundError as err:  # class folders without a single image file
        raise DataError(f"imagefolder {root} holds no images: {err}") from None
    except OSError as err:  # PIL cannot decode an image; its message names the file
        raise DataError(f"imagefolder {root}: {err}") from None
    x = torch.stack(images)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return ImageSet(x.contiguous(), torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def _open_image(path: str, mode: str, size: int):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert(mode).resize((size, size), Image.BILINEAR)


def load_s3(uri: str, cfg: DataConfig, origins: dict[str, dict] | None = None) -> ImageSet:
    """An ImageFolder tree (`s3://bucket/prefix/`) or archive of one (`s3://bucket/data.tar.gz`, `.zip`), fetched
    into the cache under `data.root` (see `kdflow.data.s3`); with `data.download: false` only the cache is used.
    `origins[uri]` receives the lineage (URI, ETags, content hash) of exactly the copy the images come from."""
    from kdflow.data import s3  # deferred: boto3 is only needed for s3:// sources

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
    raise DataError(unknown_source(spec))
