"""Unit tests for kdflow.data: readers (on the real MNIST/USPS files and hand-written IDX files), hashed
splits, the three transfer set-ups of `prepare`, and DataConfig validation."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kdflow import data
from kdflow.config import DataConfig
from kdflow.data import DataError
from tests.helpers.paths import SHARED_DATA  # the repository sits beside `shared/`: /work/shared/data

MNIST_DIR = SHARED_DATA / "mnist"
USPS_DIR = SHARED_DATA / "usps"
MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _require(path: Path, *names: str) -> Path:
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        pytest.skip(f"shared real data not available: {', '.join(str(path / n) for n in missing)} missing")
    return path


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    return _require(MNIST_DIR, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="module")
def usps_dir() -> Path:
    return _require(USPS_DIR, "usps.t.bz2")


@pytest.fixture(scope="module")
def digits() -> data.ImageSet:
    return data.load_digits_set()


def _digest(img: torch.Tensor) -> str:
    return hashlib.sha256(img.contiguous().numpy().tobytes()).hexdigest()


def _digests(x: torch.Tensor) -> list[str]:
    return [_digest(img) for img in x]


# ------------------------------------------------------------------------------------------ real data files


def test_load_mnist_idx_real(mnist_dir):
    s = data.load_mnist_idx(mnist_dir)
    assert s.x.shape == (10_000, 1, 28, 28)
    assert s.x.dtype == torch.uint8
    assert s.y.shape == (10_000,) and s.y.dtype == torch.int64
    assert s.y.min() == 0 and s.y.max() == 9
    assert torch.bincount(s.y, minlength=10).tolist() == MNIST_TEST_CLASS_COUNTS
    assert s.classes == [str(i) for i in range(10)]
    assert s.x.is_contiguous()
    assert int(s.x.max()) == 255 and int(s.x.min()) == 0
    # the first t10k label is famously a 7
    assert int(s.y[0]) == 7


def test_load_usps_real_matches_libsvm_reader(usps_dir):
    s = data.load_usps(usps_dir)
    assert s.x.shape == (2007, 1, 16, 16)
    assert s.x.dtype == torch.uint8
    assert s.y.dtype == torch.int64 and s.y.shape == (2007,)
    assert sorted(torch.unique(s.y).tolist()) == list(range(10))
    ref = data.read_usps_libsvm(usps_dir / "usps.t.bz2")
    assert ref.x.shape == (2007, 1, 16, 16) and ref.x.dtype == torch.uint8
    assert torch.equal(s.y, ref.y)
    assert int((s.x.int() - ref.x.int()).abs().max()) <= 1
    assert s.classes == ref.classes == [str(i) for i in range(10)]


def test_load_usps_and_mnist_missing_dir(tmp_path):
    with pytest.raises(DataError, match="usps"):
        data.load_usps(tmp_path)
    with pytest.raises(DataError, match="not found"):
        data.load_mnist_idx(tmp_path / "nope")
    with pytest.raises(DataError, match="idx3"):
        data.load_mnist_idx(tmp_path)


# -------------------------------------------------------------------------------------------- read_idx


def _idx_bytes(type_code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    # magic: two zero bytes, element type, number of dimensions; then each dimension as big-endian uint32
    header = bytes([0, 0, type_code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape)
    return header + payload


def test_read_idx_plain_uint8(tmp_path):
    values = bytes(range(24))
    p = tmp_path / "imgs-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x04" + values)
    arr = data.read_idx(p)
    assert arr.dtype == np.uint8
    assert arr.shape == (2, 3, 4)
    assert arr.tolist() == np.arange(24, dtype=np.uint8).reshape(2, 3, 4).tolist()


def test_read_idx_gz_matches_plain(tmp_path):
    raw = _idx_bytes(0x08, (3, 2), bytes([9, 8, 7, 6, 5, 4]))
    (tmp_path / "a-idx2-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "a-idx2-ubyte.gz", "wb") as f:
        f.write(raw)
    plain = data.read_idx(tmp_path / "a-idx2-ubyte")
    gz = data.read_idx(tmp_path / "a-idx2-ubyte.gz")
    assert plain.tolist() == gz.tolist() == [[9, 8], [7, 6], [5, 4]]


def test_read_idx_big_endian_int32(tmp_path):
    p = tmp_path / "ints-idx1"
    p.write_bytes(_idx_bytes(0x0C, (3,), struct.pack(">iii", 1, -2, 70000)))
    arr = data.read_idx(p)
    assert arr.shape == (3,)
    assert arr.tolist() == [1, -2, 70000]


def test_read_idx_errors(tmp_path):
    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(short)
    bad_type = tmp_path / "bad-type"
    bad_type.write_bytes(_idx_bytes(0x07, (1,), b"\x00"))
    with pytest.raises(DataError, match="0x07"):
        data.read_idx(bad_type)
    wrong_size = tmp_path / "wrong-size"
    wrong_size.write_bytes(_idx_bytes(0x08, (2, 2), b"\x00\x01\x02"))
    with pytest.raises(DataError, match="header says"):
        data.read_idx(wrong_size)
    bad_gz = tmp_path / "bad.gz"
    with gzip.open(bad_gz, "wb") as f:
        f.write(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(bad_gz)


def test_read_idx_truncated_header_is_data_error(tmp_path):
    p = tmp_path / "truncated"
    p.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 2))  # says 3 dims, holds one
    with pytest.raises(DataError, match="truncated IDX header"):
        data.read_idx(p)


def test_load_mnist_idx_from_hand_written_files(tmp_path):
    imgs_train = np.arange(2 * 2 * 2, dtype=np.uint8).reshape(2, 2, 2)
    imgs_test = np.full((1, 2, 2), 200, dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(0x08, (2, 2, 2), imgs_train.tobytes()))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(0x08, (2,), bytes([3, 9])))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(0x08, (1, 2, 2), imgs_test.tobytes()))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(0x08, (1,), bytes([5])))
    s = data.load_mnist_idx(tmp_path)
    assert s.x.shape == (3, 1, 2, 2) and s.x.dtype == torch.uint8
    assert s.y.tolist() == [3, 9, 5] and s.y.dtype == torch.int64
    assert s.x[:2, 0].numpy().tolist() == imgs_train.tolist()
    assert s.x[2, 0].numpy().tolist() == imgs_test[0].tolist()


def test_load_mnist_idx_count_mismatch(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(0x08, (2, 1, 1), b"\x00\x01"))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(0x08, (3,), b"\x00\x01\x02"))
    with pytest.raises(DataError, match="2 images but"):
        data.load_mnist_idx(tmp_path)


def _mnist_dir(tmp_path: Path, labels: list[int]) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "idx"
    d.mkdir()
    imgs = rng.integers(0, 255, (len(labels), 4, 4), dtype=np.uint8)
    (d / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(0x08, imgs.shape, imgs.tobytes()))
    (d / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(0x08, (len(labels),), bytes(labels)))
    return d


def test_a_label_out_of_range_fails_in_data_prep_naming_it(tmp_path):
    d = _mnist_dir(tmp_path, [i % 10 for i in range(59)] + [42])
    with pytest.raises(
        DataError, match=r"(source|target) task \(mnist-idx:.*\): label 42 is out of range for its 10 classes"
    ):
        data.prepare(DataConfig(source=f"mnist-idx:{d}", setup="domain_shift"), 0, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_task_with_one_class_fails_in_data_prep(tmp_path):
    from PIL import Image

    (tmp_path / "tree" / "cat").mkdir(parents=True)
    for i in range(30):
        Image.new("L", (8, 8), i).save(tmp_path / "tree" / "cat" / f"{i}.png")
    cfg = DataConfig(
        source="digits", target=f"imagefolder:{tmp_path / 'tree'}", setup="cross_dataset", image_size=8, channels=1
    )
    with pytest.raises(DataError, match=r"target task \(imagefolder:.*\): only one class \('cat'\) has images"):
        data.prepare(cfg, 0, tmp_path / "out")


def test_a_truncated_gzip_is_named(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, 800, dtype=np.uint8).tobytes()  # barely compressible
    packed = gzip.compress(_idx_bytes(0x08, (50, 4, 4), noise))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(packed[: len(packed) // 2])  # a download cut in half
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: unreadable \(EOFError"):
        data.read_idx(path)


# ---------------------------------------------------------------------------------------------- digits


def test_load_digits_set(digits):
    assert digits.x.shape == (1797, 1, 8, 8)
    assert digits.x.dtype == torch.uint8
    assert digits.y.shape == (1797,) and digits.y.dtype == torch.int64
    assert digits.classes == [str(i) for i in range(10)]
    assert sorted(torch.unique(digits.y).tolist()) == list(range(10))
    assert int(digits.x.max()) == 255 and int(digits.x.min()) == 0


def test_image_set_validation():
    with pytest.raises(DataError, match="uint8"):
        data.ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(DataError, match="uint8"):
        data.ImageSet(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(DataError, match="2 images but 3 labels"):
        data.ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"])


# -------------------------------------------------------------------------------------------- hashed splits

FRACTIONS = {"train": 0.6, "val": 0.15, "test": 0.25}


def test_sample_hashes_uniform_in_unit_interval(digits):
    u = data.sample_hashes(digits.x, "s")
    assert u.shape == (1797,) and u.dtype == np.float64
    assert (u >= 0).all() and (u < 1).all()
    assert 0.4 < u.mean() < 0.6
    assert np.array_equal(u, data.sample_hashes(digits.x, "s"))
    assert not np.array_equal(u, data.sample_hashes(digits.x, "t"))


def test_hashed_split_deterministic_disjoint_covering(digits):
    a = data.hashed_split(digits.x, FRACTIONS, "salt/0")
    b = data.hashed_split(digits.x, FRACTIONS, "salt/0")
    assert list(a) == ["train", "val", "test"]
    for name in a:
        assert torch.equal(a[name], b[name])
        assert a[name].dtype == torch.int64
        assert torch.equal(a[name], torch.sort(a[name]).values)
    sets = {k: set(v.tolist()) for k, v in a.items()}
    for p, q in itertools.combinations(sets.values(), 2):
        assert not p & q
    assert set().union(*sets.values()) == set(range(1797))
    assert sum(len(v) for v in a.values()) == 1797
    for name, frac in FRACTIONS.items():
        assert abs(len(a[name]) / 1797 - frac) < 0.05


def test_hashed_split_changes_with_salt(digits):
    a = data.hashed_split(digits.x, FRACTIONS, "salt/0")
    b = data.hashed_split(digits.x, FRACTIONS, "salt/1")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert set(a["test"].tolist()) != set(b["test"].tolist())


def test_hashed_split_is_order_independent(digits):
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    a = data.hashed_split(digits.x, FRACTIONS, "salt/0")
    b = data.hashed_split(digits.x[perm], FRACTIONS, "salt/0")
    for name in FRACTIONS:
        # position j of the permuted set is image perm[j] of the original
        assert set(perm[b[name]].tolist()) == set(a[name].tolist())


def test_hashed_split_same_image_same_split(digits):
    x = torch.cat([digits.x[:50], digits.x[:50]])  # every image twice
    parts = data.hashed_split(x, FRACTIONS, "dup")
    where = {int(i): name for name, idx in parts.items() for i in idx}
    assert all(where[i] == where[i + 50] for i in range(50))


# ---------------------------------------------------------------------------------- small transformations


def test_apply_shift():
    x = torch.arange(4, dtype=torch.uint8).view(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    assert data.apply_shift(x, "hflip")[0, 0].tolist() == [[1, 0], [3, 2]]
    assert data.apply_shift(x, "vflip")[0, 0].tolist() == [[2, 3], [0, 1]]
    assert data.apply_shift(x, "rot90")[0, 0].tolist() == [[1, 3], [0, 2]]
    assert data.apply_shift(x, "invert")[0, 0].tolist() == [[255, 254], [253, 252]]
    with pytest.raises(DataError, match="blur"):
        data.apply_shift(x, "blur")


def test_conform_resizes_and_converts_channels():
    s = data.ImageSet(torch.full((2, 1, 8, 8), 100, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    c = data.conform(s, 16, 3)
    assert c.x.shape == (2, 3, 16, 16) and c.x.dtype == torch.uint8
    assert int(c.x.min()) == int(c.x.max()) == 100  # a constant image stays constant
    back = data.conform(c, 4, 1)
    assert back.x.shape == (2, 1, 4, 4)
    assert int(back.x.min()) == int(back.x.max()) == 100  # 0.299 + 0.587 + 0.114 = 1
    assert torch.equal(data.conform(s, 8, 1).x, s.x)  # already the right size and channels: unchanged


def test_select_classes_and_limit_per_class(digits):
    s = data.select_classes(digits, [7, 2])
    assert s.classes == ["7", "2"]
    assert torch.bincount(s.y).tolist() == [int((digits.y == 7).sum()), int((digits.y == 2).sum())]
    with pytest.raises(DataError, match=r"\[10\]"):
        data.select_classes(digits, [1, 10])
    few = data.limit_per_class(digits, 4, "few")
    assert torch.bincount(few.y, minlength=10).tolist() == [4] * 10
    assert torch.equal(few.x, data.limit_per_class(digits, 4, "few").x)


# ----------------------------------------------------------------------------------------------- prepare


def _load_all(out: Path) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    return {(t, s): data.load_split(out, t, s) for t in data.TASKS for s in data.SPLITS}


def _check_prepared(out: Path, manifest: dict) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """Checks every set-up shares: files, weights-only loading, counts, disjoint splits, hashes, normalisation."""
    assert json.loads((out / "manifest.json").read_text()) == manifest == data.read_manifest(out)
    splits = _load_all(out)
    for (task, split), (x, y) in splits.items():
        # plain weights-only tensors
        blob = torch.load(out / f"{task}_{split}.pt", weights_only=True)
        assert set(blob) == {"x", "y"}
        assert x.dtype == torch.uint8 and x.ndim == 4 and y.dtype == torch.int64
        info = manifest["tasks"][task]
        assert manifest["tasks"][task]["counts"][split] == len(x) == len(y) > 0
        assert list(x.shape[1:]) == info["shape"]
        assert int(y.min()) >= 0 and int(y.max()) < info["num_classes"] == len(info["classes"])
    # no image is in two splits, within a task or across the two tasks
    digest_sets = {key: set(_digests(x)) for key, (x, _) in splits.items()}
    for key, (x, _) in splits.items():
        assert len(digest_sets[key]) == len(x), f"duplicate images inside {key}"
    for a, b in itertools.combinations(digest_sets, 2):
        assert not digest_sets[a] & digest_sets[b], f"{a} and {b} share images"
    # hashes recomputable from the files
    hashes = [data.tensor_hash(*splits[(t, s)]) for t in data.TASKS for s in data.SPLITS]
    assert manifest["content_hash"] == hashlib.sha256("".join(hashes).encode()).hexdigest()
    assert manifest["target_test_hash"] == data.tensor_hash(*splits[("target", "test")])
    # normalisation from the source training images
    train_x = splits[("source", "train")][0].float() / 255
    assert manifest["normalization"]["mean"] == pytest.approx(train_x.mean(dim=(0, 2, 3)).tolist(), rel=1e-5)
    assert manifest["normalization"]["std"] == pytest.approx(train_x.std(dim=(0, 2, 3)).tolist(), rel=1e-5)
    return splits


def test_prepare_domain_shift(tmp_path, digits):
    cfg = DataConfig(source="digits", setup="domain_shift", shift="hflip")
    out = tmp_path / "a"
    manifest = data.prepare(cfg, 0, out)
    assert manifest["setup"] == "domain_shift" and manifest["seed"] == 0
    assert manifest["tasks"]["source"]["spec"] == manifest["tasks"]["target"]["spec"] == "digits"
    assert manifest["tasks"]["source"]["shape"] == manifest["tasks"]["target"]["shape"] == [1, 8, 8]
    splits = _check_prepared(out, manifest)

    label_of = dict(zip(_digests(digits.x), digits.y.tolist()))
    src = {d for s in data.SPLITS for d in _digests(splits[("source", s)][0])}
    tgt_unflipped = set()
    for s in data.SPLITS:
        x, y = splits[("target", s)]
        for img, lab in zip(x.flip(-1), y.tolist()):
            d = _digest(img)
            assert d in label_of, "a target image is not a horizontally flipped digits image"
            assert label_of[d] == lab
            tgt_unflipped.add(d)
    for s in data.SPLITS:
        for img, lab in zip(*splits[("source", s)]):
            assert label_of[_digest(img)] == int(lab)
    # the two tasks are disjoint halves of digits (by original image) that together cover it
    assert not src & tgt_unflipped
    assert src | tgt_unflipped == set(label_of)
    n_src = sum(manifest["tasks"]["source"]["counts"].values())
    assert abs(n_src / 1797 - cfg.source_fraction) < 0.05

    # deterministic: the same seed reproduces the content hash, another seed changes it
    again = data.prepare(cfg, 0, tmp_path / "b")
    assert again["content_hash"] == manifest["content_hash"]
    assert again == manifest
    other = data.prepare(cfg, 1, tmp_path / "c")
    assert other["content_hash"] != manifest["content_hash"]
    assert other["target_test_hash"] != manifest["target_test_hash"]


def test_prepare_class_split(tmp_path, digits):
    cfg = DataConfig(
        source="digits", setup="class_split", source_classes=[0, 1, 2, 3, 4], target_classes=[5, 6, 7, 8, 9]
    )
    manifest = data.prepare(cfg, 0, tmp_path)
    splits = _check_prepared(tmp_path, manifest)
    assert manifest["tasks"]["source"]["classes"] == ["0", "1", "2", "3", "4"]
    assert manifest["tasks"]["target"]["classes"] == ["5", "6", "7", "8", "9"]
    assert manifest["tasks"]["source"]["num_classes"] == manifest["tasks"]["target"]["num_classes"] == 5
    label_of = dict(zip(_digests(digits.x), digits.y.tolist()))
    for task, offset in (("source", 0), ("target", 5)):
        labels = torch.cat([splits[(task, s)][1] for s in data.SPLITS])
        assert sorted(torch.unique(labels).tolist()) == [0, 1, 2, 3, 4]
        for s in data.SPLITS:
            x, y = splits[(task, s)]
            for img, lab in zip(x, y.tolist()):
                assert label_of[_digest(img)] == lab + offset  # target labels remapped 5..9 → 0..4
        total = sum(manifest["tasks"][task]["counts"].values())
        assert total == int(((digits.y >= offset) & (digits.y < offset + 5)).sum())


def test_prepare_class_split_defaults_halve_the_classes(tmp_path):
    manifest = data.prepare(DataConfig(setup="class_split"), 0, tmp_path)
    assert manifest["tasks"]["source"]["classes"] == ["0", "1", "2", "3", "4"]
    assert manifest["tasks"]["target"]["classes"] == ["5", "6", "7", "8", "9"]


def test_class_split_overlap_with_default_source_classes_is_rejected():
    cfg = DataConfig(setup="class_split", target_classes=[3, 4, 5])
    with pytest.raises(DataError, match=r"overlap: \[3, 4\]"):
        data.build_tasks(cfg, 0)


def test_prepare_cross_dataset_mnist_to_usps(tmp_path, mnist_dir, usps_dir):
    cfg = DataConfig(
        source=f"mnist-idx:{mnist_dir}",
        target=f"usps:{usps_dir}",
        setup="cross_dataset",
        image_size=16,
        target_samples_per_class=3,
    )
    manifest = data.prepare(cfg, 0, tmp_path / "a")
    splits = _check_prepared(tmp_path / "a", manifest)
    src, tgt = manifest["tasks"]["source"], manifest["tasks"]["target"]
    assert src["spec"] == cfg.source and tgt["spec"] == cfg.target
    assert src["shape"] == tgt["shape"] == [1, 16, 16]
    assert sum(src["counts"].values()) == 10_000
    assert torch.bincount(splits[("target", "train")][1], minlength=10).tolist() == [3] * 10
    assert tgt["counts"]["train"] == 30
    # few-shot caps validation too (selection rests on no more labels than training had); test keeps its share
    assert torch.bincount(splits[("target", "val")][1], minlength=10).tolist() == [3] * 10
    assert 0.2 * 2007 < tgt["counts"]["test"] < 0.3 * 2007
    whole_val = data.prepare(cfg.model_copy(update={"target_val_samples_per_class": None}), 0, tmp_path / "v")
    assert 0.1 * 2007 < whole_val["tasks"]["target"]["counts"]["val"] < 0.2 * 2007  # its hashed ~15% share
    assert whole_val["tasks"]["target"]["counts"]["test"] == tgt["counts"]["test"]
    five = data.prepare(cfg.model_copy(update={"target_val_samples_per_class": 5}), 0, tmp_path / "f")
    assert five["tasks"]["target"]["counts"]["val"] == 50 and five["tasks"]["target"]["counts"]["train"] == 30
    usps = set(_digests(data.load_usps(usps_dir).x))
    for s in data.SPLITS:
        assert set(_digests(splits[("target", s)][0])) <= usps  # already 16×16: unchanged
    again = data.prepare(cfg, 0, tmp_path / "b")
    assert again["content_hash"] == manifest["content_hash"]
    other = data.prepare(cfg, 1, tmp_path / "c")
    assert other["content_hash"] != manifest["content_hash"]


def test_prepare_max_source_samples(tmp_path):
    manifest = data.prepare(DataConfig(max_source_samples=100), 0, tmp_path)
    assert manifest["tasks"]["source"]["counts"]["train"] == 100
    assert len(data.load_split(tmp_path, "source", "train")[0]) == 100


def test_normalizer_from_manifest(tmp_path):
    manifest = data.prepare(DataConfig(), 0, tmp_path)
    norm = data.Normalizer.from_manifest(manifest)
    x, _ = data.load_split(tmp_path, "source", "train")
    z = norm(x)
    assert z.dtype == torch.float32 and z.shape == x.shape
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(z.std()) == pytest.approx(1.0, rel=1e-3)


# ------------------------------------------------------------------------------------------- validation


def test_data_config_cross_dataset_needs_target():
    with pytest.raises(ValidationError, match="data.target is required"):
        DataConfig(source="digits", setup="cross_dataset")


def test_data_config_target_only_with_cross_dataset():
    with pytest.raises(ValidationError, match="only makes sense"):
        DataConfig(source="digits", target="usps:/x", setup="domain_shift")
    DataConfig(source="digits", target="digits", setup="domain_shift")  # target == source is harmless


def test_data_config_overlapping_classes():
    with pytest.raises(ValidationError, match=r"overlap: \[3, 4\]"):
        DataConfig(setup="class_split", source_classes=[0, 1, 2, 3, 4], target_classes=[3, 4, 5])


@pytest.mark.parametrize(
    "field, value",
    [
        ("source_fraction", 0.0),
        ("source_fraction", 1.0),
        ("val_fraction", 0.5),
        ("test_fraction", 0.0),
        ("image_size", 2),
        ("channels", 2),
        ("setup", "mixup"),
        ("shift", "blur"),
        ("target_samples_per_class", 0),
    ],
)
def test_data_config_ranges(field, value):
    with pytest.raises(ValidationError, match=field):
        DataConfig(**{field: value})


def test_data_config_forbids_unknown_keys():
    with pytest.raises(ValidationError, match="sourec"):
        DataConfig(sourec="digits")


@pytest.mark.parametrize("spec", ["nope", "mnist-idx", "digits:extra", "svhn"])
def test_unknown_source_names_it(spec):
    with pytest.raises(DataError, match="unknown data source") as err:
        data.load_source(spec, DataConfig())
    assert repr(spec) in str(err.value)


def test_prepare_unknown_source(tmp_path):
    with pytest.raises(DataError, match="'not-a-dataset'"):
        data.prepare(DataConfig(source="not-a-dataset"), 0, tmp_path)


def test_class_indices_out_of_range(tmp_path):
    cfg = DataConfig(setup="class_split", source_classes=[0, 1], target_classes=[11])
    with pytest.raises(DataError, match=r"\[11\]"):
        data.prepare(cfg, 0, tmp_path)


def test_load_imagefolder_decodes_resizes_and_labels(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 30), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20 + i, 12), (value, value, value)).save(tmp_path / cls / f"{i}.png")
    s = data.load_imagefolder(tmp_path, image_size=8, channels=3)
    assert s.x.shape == (6, 3, 8, 8) and s.x.dtype == torch.uint8
    assert s.classes == ["cat", "dog"]
    assert s.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert set(s.x[:3].unique().tolist()) == {30} and set(s.x[3:].unique().tolist()) == {200}
    grey = data.load_source(f"imagefolder:{tmp_path}", DataConfig(image_size=4, channels=1))
    assert grey.x.shape == (6, 1, 4, 4)
    with pytest.raises(DataError, match="needs data.image_size"):
        data.load_imagefolder(tmp_path, image_size=None, channels=3)
    with pytest.raises(DataError, match="imagefolder path not found"):
        data.load_imagefolder(tmp_path / "missing", image_size=8, channels=3)


def test_torchvision_source_without_files_or_download_names_the_dataset(tmp_path):
    cfg = DataConfig(source="mnist", root=str(tmp_path), download=False)
    with pytest.raises(DataError, match="cannot load torchvision dataset 'mnist'"):
        data.load_source("mnist", cfg)


def test_an_imagefolder_whose_class_folders_hold_no_image_is_a_data_error_naming_it(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as err:
        data.load_imagefolder(tmp_path, image_size=8, channels=1)
    assert str(err.value).startswith(
        f"imagefolder {tmp_path} holds no images: Found no valid file for the classes cat, dog."
    )


def test_an_undecodable_image_is_a_data_error_naming_the_file(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.new("L", (8, 8), 3).save(tmp_path / cls / "0.png")
    bad = tmp_path / "dog" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then nothing
    with pytest.raises(DataError) as err:
        data.load_imagefolder(tmp_path, image_size=8, channels=1)
    assert str(err.value) == f"imagefolder {tmp_path}: cannot identify image file '{bad}'"
