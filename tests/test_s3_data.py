"""s3:// data sources against a real S3 API: moto's server on 127.0.0.1, driven through boto3 exactly as on the
cluster (credentials and endpoint from the environment). Trees and archives must load to the very tensors the same
ImageFolder tree gives locally; the cache must skip unchanged objects, refetch changed ones and never be left
half-written; unsafe archives and missing buckets/keys/prefixes must fail naming the URI."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from moto.server import ThreadedMotoServer
from PIL import Image

from kdflow import data
from kdflow.config import DataConfig
from kdflow.data import DataError, s3

CLASSES_A = (0, 1, 2)
CLASSES_B = (3, 4, 5)
PER_CLASS = 12
N_IMAGES = len(CLASSES_A) * PER_CLASS


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def endpoint():
    """moto's S3 server on a free loopback port, stopped when the module is done."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def env(endpoint, monkeypatch, tmp_path):
    """Dummy credentials and the endpoint, as the cluster's Secret and ConfigMap provide them; nothing from ~/.aws."""
    for var in ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return endpoint


@pytest.fixture
def calls(monkeypatch):
    """S3 operations kdflow's client issues, in order (boto3 `before-call` events)."""
    seen: list[str] = []
    real = s3.client

    def counting_client():
        c = real()
        c.meta.events.register("before-call.s3.*", lambda model, **_: seen.append(model.name))
        return c

    monkeypatch.setattr(s3, "client", counting_client)
    return seen


def _write_tree(root: Path, classes: tuple[int, ...]) -> Path:
    """An ImageFolder tree of digits PNGs (8×8 grey), plus files ImageFolder ignores: a loose image, non-images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.round(d.images * 255 / 16).astype(np.uint8)
    for c in classes:
        (root / str(c)).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == c)[:PER_CLASS]):
            Image.fromarray(imgs[i], mode="L").save(root / str(c) / f"img{j:03d}.png")
    (root / str(classes[0]) / "notes.txt").write_text("not an image")
    (root / "labels.csv").write_text("class,name\n")
    Image.fromarray(imgs[0], mode="L").save(root / "cover.png")  # not inside a class folder
    return root


@pytest.fixture(scope="module")
def tree_a(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("tree") / "digits", CLASSES_A)


@pytest.fixture(scope="module")
def tree_b(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("tree") / "digits_b", CLASSES_B)


def _entries(folder: Path) -> list[str]:
    """What a cache folder holds besides the fetch locks (`<cache>.lock`, which stay, empty, once released)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def _files(tree: Path) -> list[Path]:
    return sorted(p for p in tree.rglob("*") if p.is_file())


def _tar_gz(tree: Path) -> bytes:
    """A .tar.gz holding the tree inside one top-level folder (`digits/0/img000.png`)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    return buf.getvalue()


def _zip(tree: Path) -> bytes:
    """A .zip holding the class folders at its top level (`0/img000.png`)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in _files(tree):
            zf.write(p, p.relative_to(tree).as_posix())
    return buf.getvalue()


def _bucket(endpoint: str, name: str):
    c = boto3.client("s3", endpoint_url=endpoint)
    c.create_bucket(Bucket=name)
    return c


def _upload_tree(c, bucket: str, prefix: str, tree: Path) -> None:
    for p in _files(tree):
        c.upload_file(str(p), bucket, prefix + p.relative_to(tree).as_posix())


def _cfg(tmp_path: Path, source: str, **kw) -> DataConfig:
    return DataConfig(source=source, image_size=8, channels=1, root=str(tmp_path / "cache"), **kw)


def _assert_same(got: data.ImageSet, want: data.ImageSet) -> None:
    assert got.classes == want.classes
    assert got.x.shape == want.x.shape and got.x.dtype == torch.uint8
    assert torch.equal(got.x, want.x)
    assert torch.equal(got.y, want.y)


# -------------------------------------------------------------------------------------------------- trees


def test_tree_loads_like_the_local_imagefolder_and_paginates(env, calls, tree_a, tmp_path):
    c = _bucket(env, "trees")
    _upload_tree(c, "trees", "sets/digits/", tree_a)
    c.put_object(Bucket="trees", Key="sets/digits-old/0/x.png", Body=b"must not be listed")  # a sibling prefix

    got = data.load_source("s3://trees/sets/digits", _cfg(tmp_path, "s3://trees/sets/digits"))
    want = data.load_imagefolder(tree_a, 8, 1)
    _assert_same(got, want)
    assert got.x.shape == (N_IMAGES, 1, 8, 8) and got.classes == ["0", "1", "2"]
    assert torch.bincount(got.y).tolist() == [PER_CLASS] * 3
    assert calls.count("GetObject") == N_IMAGES  # only the class-folder images: no txt/csv, no loose cover.png
    assert calls.count("ListObjectsV2") == 1

    # the images + notes.txt + labels.csv + cover.png, 5 per page: every page is listed, same tree
    calls.clear()
    fetched = s3.fetch("s3://trees/sets/digits/", tmp_path / "cache2", page_size=5)
    assert calls.count("ListObjectsV2") == -(-(N_IMAGES + 3) // 5) and len(fetched.downloaded) == N_IMAGES
    _assert_same(data.load_imagefolder(fetched.root, 8, 1), want)


def test_cache_skips_unchanged_refetches_changed_drops_deleted(env, calls, tree_a, tmp_path):
    c = _bucket(env, "changing")
    _upload_tree(c, "changing", "d/", tree_a)
    uri, cfg = "s3://changing/d/", _cfg(tmp_path, "s3://changing/d/")
    first = data.load_source(uri, cfg)
    assert calls.count("GetObject") == N_IMAGES
    cache = s3.cache_dir(s3.parse_uri(uri), data.s3_cache_root(cfg))
    marker = json.loads((cache / s3.MARKER).read_text())
    assert len(marker["objects"]) == N_IMAGES

    calls.clear()
    _assert_same(data.load_source(uri, cfg), first)
    assert calls == ["ListObjectsV2"]  # listing only, nothing downloaded
    assert json.loads((cache / s3.MARKER).read_text()) == marker

    # overwrite one image with its inverse: exactly that object is fetched again
    changed = tree_a / "1" / "img004.png"
    inverted = 255 - np.asarray(Image.open(changed))
    buf = io.BytesIO()
    Image.fromarray(inverted, mode="L").save(buf, format="PNG")
    c.put_object(Bucket="changing", Key="d/1/img004.png", Body=buf.getvalue())
    calls.clear()
    third = data.load_source(uri, cfg)
    assert calls == ["ListObjectsV2", "GetObject"]
    i = PER_CLASS + 4  # ImageFolder order: class 1, fifth file
    assert torch.equal(third.x[i, 0], torch.from_numpy(inverted))
    keep = torch.arange(N_IMAGES) != i
    assert torch.equal(third.x[keep], first.x[keep]) and torch.equal(third.y, first.y)
    new_marker = json.loads((cache / s3.MARKER).read_text())
    assert new_marker["objects"]["d/1/img004.png"]["sha256"] == hashlib.sha256(buf.getvalue()).hexdigest()
    assert new_marker["objects"]["d/1/img004.png"]["etag"] != marker["objects"]["d/1/img004.png"]["etag"]

    # a deleted object disappears from the cache too
    c.delete_object(Bucket="changing", Key="d/2/img000.png")
    calls.clear()
    fourth = data.load_source(uri, cfg)
    assert calls == ["ListObjectsV2"] and len(fourth.x) == N_IMAGES - 1
    assert not (cache / "tree" / "2" / "img000.png").exists()
    assert _entries(cache.parent) == [cache.name]  # no temp or old folders left


def test_interrupted_download_never_leaves_a_half_cache(env, tree_a, tmp_path, monkeypatch):
    c = _bucket(env, "flaky")
    _upload_tree(c, "flaky", "d/", tree_a)
    uri, cfg = "s3://flaky/d/", _cfg(tmp_path, "s3://flaky/d/")
    cache = s3.cache_dir(s3.parse_uri(uri), data.s3_cache_root(cfg))
    real = s3._download
    budget = {"n": 5}

    def dying(*args):
        if budget["n"] == 0:
            raise KeyboardInterrupt  # the pod is killed mid-download
        budget["n"] -= 1
        return real(*args)

    monkeypatch.setattr(s3, "_download", dying)
    with pytest.raises(KeyboardInterrupt):
        data.load_source(uri, cfg)
    assert not cache.exists() and _entries(cache.parent) == []

    monkeypatch.setattr(s3, "_download", real)
    good = data.load_source(uri, cfg)
    marker = (cache / s3.MARKER).read_text()

    # an interrupted update keeps the previous complete version in place
    c.put_object(Bucket="flaky", Key="d/0/img000.png", Body=(tree_a / "2" / "img000.png").read_bytes())
    budget["n"] = 0
    monkeypatch.setattr(s3, "_download", dying)
    with pytest.raises(KeyboardInterrupt):
        data.load_source(uri, cfg)
    assert (cache / s3.MARKER).read_text() == marker
    assert _entries(cache.parent) == [cache.name]
    _assert_same(data.load_source(uri, cfg.model_copy(update={"download": False})), good)


def test_a_killed_fetchs_leftovers_are_removed_and_fetches_take_turns(env, tree_a, tmp_path):
    import fcntl
    import threading
    import time

    c = _bucket(env, "turns")
    _upload_tree(c, "turns", "d/", tree_a)
    uri, cfg = "s3://turns/d/", _cfg(tmp_path, "s3://turns/d/")
    cache = s3.cache_dir(s3.parse_uri(uri), data.s3_cache_root(cfg))
    cache.parent.mkdir(parents=True)
    for leftover in (f"{cache.name}.tmp-killed", f"{cache.name}.old-123-abcd"):  # a pod killed mid-fetch
        (cache.parent / leftover / "tree").mkdir(parents=True)
    done = []
    with open(cache.parent / f"{cache.name}.lock", "a") as held:  # another process is fetching this location
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: done.append(data.load_source(uri, cfg)))
        t.start()
        time.sleep(0.3)
        assert done == [] and not cache.exists()  # waits for its turn
        fcntl.flock(held, fcntl.LOCK_UN)
    t.join(60)
    _assert_same(done[0], data.load_imagefolder(tree_a, 8, 1))
    assert _entries(cache.parent) == [cache.name]  # the leftovers are gone


def test_offline_uses_the_cache_without_contacting_the_store(env, calls, tree_a, tmp_path, monkeypatch):
    c = _bucket(env, "offline")
    _upload_tree(c, "offline", "d/", tree_a)
    cfg = _cfg(tmp_path, "s3://offline/d/")
    with pytest.raises(DataError, match=r"s3://offline/d/ is not in the local cache .* data.download is false"):
        data.load_source("s3://offline/d/", cfg.model_copy(update={"download": False}))
    online = data.load_source("s3://offline/d/", cfg)
    calls.clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    _assert_same(data.load_source("s3://offline/d/", cfg.model_copy(update={"download": False})), online)
    # the same folder spelled without its trailing slash finds the same cache
    _assert_same(data.load_source("s3://offline/d", cfg.model_copy(update={"download": False})), online)
    root = data.s3_cache_root(cfg)
    assert (
        s3.fetch("s3://offline/d", root, offline=True).lineage
        == s3.fetch("s3://offline/d/", root, offline=True).lineage
    )
    assert calls == []


# ------------------------------------------------------------------------------------------------ archives


@pytest.mark.parametrize("key, make", [("sets/digits.tar.gz", _tar_gz), ("sets/digits.zip", _zip)])
def test_archive_loads_like_the_local_imagefolder(env, calls, tree_a, tmp_path, key, make):
    bucket = "archives-" + key.rpartition(".")[2]
    c = _bucket(env, bucket)
    c.put_object(Bucket=bucket, Key=key, Body=make(tree_a))
    uri = f"s3://{bucket}/{key}"
    cfg = _cfg(tmp_path, uri)
    want = data.load_imagefolder(tree_a, 8, 1)
    _assert_same(data.load_source(uri, cfg), want)
    assert calls == ["HeadObject", "GetObject"]

    calls.clear()
    _assert_same(data.load_source(uri, cfg), want)
    assert calls == ["HeadObject"]  # unchanged ETag: no download

    # replaced by an archive with one class fewer: fetched and extracted again, stale files gone
    smaller = tmp_path / "smaller" / "digits"
    for p in _files(tree_a):
        if p.parent.name != "2":
            (smaller / p.relative_to(tree_a)).parent.mkdir(parents=True, exist_ok=True)
            (smaller / p.relative_to(tree_a)).write_bytes(p.read_bytes())
    c.put_object(Bucket=bucket, Key=key, Body=make(smaller))
    calls.clear()
    got = data.load_source(uri, cfg)
    assert calls == ["HeadObject", "GetObject"]
    assert got.classes == ["0", "1"] and len(got.x) == 2 * PER_CLASS
    _assert_same(got, data.load_imagefolder(smaller, 8, 1))


def test_archive_skips_macos_metadata_hidden_folders_and_non_images(env, tree_a, tmp_path):
    png = _files(tree_a)[0].read_bytes()  # real images: if these entries were read they would add data
    buf = io.BytesIO(_zip(tree_a))
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("__MACOSX/0/._img000.png", png)  # what macOS's Finder adds to every zip
        zf.writestr("__MACOSX/extra/img.png", png)
        zf.writestr(".hidden/0/img.png", png)
        zf.writestr("0/.img-preview.png", png)
        zf.writestr("0/labels.csv", b"not an image")
    c = _bucket(env, "junk")
    c.put_object(Bucket="junk", Key="d.zip", Body=buf.getvalue())
    _assert_same(
        data.load_source("s3://junk/d.zip", _cfg(tmp_path, "s3://junk/d.zip")), data.load_imagefolder(tree_a, 8, 1)
    )


def _evil_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        png = io.BytesIO()
        Image.new("L", (8, 8)).save(png, format="PNG")
        for name in ("0/ok.png", "1/ok.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
        info = tarfile.TarInfo("0/../../evil.png" if kind == "dotdot" else "1/link.png")
        if kind == "dotdot":
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
        else:
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def _evil_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("0/ok.png", b"x")
        zf.writestr("../evil.png", b"x")
    return buf.getvalue()


@pytest.mark.parametrize(
    "key, body, reason",
    [
        ("evil.tar.gz", lambda: _evil_tar("dotdot"), r"member '0/\.\./\.\./evil\.png' is not a safe relative path"),
        ("link.tar.gz", lambda: _evil_tar("symlink"), r"member '1/link\.png' is unsafe"),
        ("evil.zip", _evil_zip, r"member '\.\./evil\.png' is not a safe relative path"),
    ],
)
def test_unsafe_archives_are_rejected(env, tmp_path, key, body, reason):
    bucket = "evil-" + key.partition(".")[0]
    c = _bucket(env, bucket)
    c.put_object(Bucket=bucket, Key=key, Body=body())
    uri = f"s3://{bucket}/{key}"
    cfg = _cfg(tmp_path / "deep", uri)
    with pytest.raises(DataError, match=rf"^{uri}: archive {reason}"):
        data.load_source(uri, cfg)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "deep" / "evil.png").exists()
    assert _entries(data.s3_cache_root(cfg) / bucket) == []  # nothing cached, no temp folder left


def _sizes(tree: Path) -> list[int]:
    return [p.stat().st_size for p in _files(tree)]


@pytest.mark.parametrize(
    "var, value, kind, message",
    [
        (
            "KDFLOW_S3_MAX_FILES",
            "5",
            "zip",
            r"the archive holds 3\d image files, over the limit of 5 \(KDFLOW_S3_MAX_FILES\)",
        ),
        ("KDFLOW_S3_MAX_FILES", "5", "tar.gz", r"the archive holds 3\d image files, over the limit of 5"),
        ("KDFLOW_S3_MAX_FILES", "5", "tree", r"the prefix holds 3\d image files, over the limit of 5"),
        (
            "KDFLOW_S3_MAX_FILE_BYTES",
            "100",
            "zip",
            r"the archive member '[^']+' is \d+ bytes, over the per-file limit of 100",
        ),
        ("KDFLOW_S3_MAX_FILE_BYTES", "100", "tree", r"the prefix member '[^']+' is \d+ bytes, over the per-file"),
        (
            "KDFLOW_S3_MAX_BYTES",
            "2000",
            "tar.gz",
            r"the archive is [\d,]+ bytes, over the limit of 2,000 \(KDFLOW_S3_MAX_BYTES\)",
        ),
        ("KDFLOW_S3_MAX_BYTES", "2000", "tree", r"the prefix holds [\d,]+ bytes of images, over the limit of 2,000"),
    ],
)
def test_fetches_over_a_limit_are_refused_before_anything_is_cached(
    env, tree_a, tmp_path, monkeypatch, var, value, kind, message
):
    """Limits on files, bytes per file and total bytes: checked on the listing or the archive's declared member
    sizes, before a download or an extraction; nothing is cached."""
    assert len(_files(tree_a)) > 5 and max(_sizes(tree_a)) > 100 and sum(_sizes(tree_a)) > 2000
    bucket = f"limits-{kind.replace('.', '')}-{var.lower().replace('_', '')[8:]}"
    c = _bucket(env, bucket)
    if kind == "tree":
        _upload_tree(c, bucket, "digits/", tree_a)
        uri = f"s3://{bucket}/digits/"
    else:
        c.put_object(Bucket=bucket, Key=f"d.{kind}", Body=(_zip if kind == "zip" else _tar_gz)(tree_a))
        uri = f"s3://{bucket}/d.{kind}"
    monkeypatch.setenv(var, value)
    cfg = _cfg(tmp_path, uri)
    with pytest.raises(DataError, match=rf"^{re.escape(uri)}: {message}"):
        data.load_source(uri, cfg)
    assert _entries(data.s3_cache_root(cfg) / bucket) == []
    monkeypatch.delenv(var)
    assert len(data.load_source(uri, cfg).x) == N_IMAGES  # within the defaults it loads


def test_a_bad_limit_setting_is_named(env, tmp_path, monkeypatch):
    monkeypatch.setenv("KDFLOW_S3_MAX_FILES", "lots")
    with pytest.raises(DataError, match=r"^KDFLOW_S3_MAX_FILES='lots': expected a whole number of 1 or more$"):
        s3.Limits.from_env()


# -------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_uri_and_the_reason(env, tmp_path):
    c = _bucket(env, "errs")
    c.put_object(Bucket="errs", Key="docs/readme.txt", Body=b"x")
    c.put_object(Bucket="errs", Key="docs/guide.md", Body=b"x")
    c.put_object(Bucket="errs", Key="flat/a.png", Body=b"x")
    cases = {
        "s3://no-such-bucket/digits/": "cannot read s3://no-such-bucket/digits/: bucket 'no-such-bucket' does not "
        f"exist at {env}",
        "s3://no-such-bucket/d.zip": f"cannot read s3://no-such-bucket/d.zip: bucket 'no-such-bucket' does not "
        f"exist at {env}",
        "s3://errs/missing.tar.gz": f"cannot read s3://errs/missing.tar.gz: no object 'missing.tar.gz' in bucket "
        f"'errs' at {env}",
        "s3://errs/empty/": "s3://errs/empty/: no objects under this prefix (empty, or a typo in the prefix?)",
        "s3://errs/docs": "s3://errs/docs: none of its 2 objects is an image in a class folder (docs/<class>/<name>",
        "s3://errs/flat/": "1 images lie directly under the prefix, not in class folders",
        "s3://": "s3://: '' is not a valid bucket name",
    }
    for uri, message in cases.items():
        with pytest.raises(DataError) as err:
            data.load_source(uri, _cfg(tmp_path, uri))
        assert message in str(err.value), (uri, str(err.value))
    with pytest.raises(DataError, match=r"^s3://errs/docs/ needs data.image_size"):
        data.load_source("s3://errs/docs/", DataConfig(source="digits", root=str(tmp_path)))


def test_missing_credentials_are_a_data_error(env, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(DataError, match=r"^cannot read s3://any/d/: no S3 credentials .*AWS_ACCESS_KEY_ID"):
        data.load_source("s3://any/d/", _cfg(tmp_path, "s3://any/d/"))


def test_endpoint_from_aws_variables_or_the_mlflow_fallback(env, tree_a, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://mlflow-minio:9000")
    assert s3.endpoint_url() is None and s3.client().meta.endpoint_url == env  # boto3 reads AWS_ENDPOINT_URL
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert s3.client().meta.endpoint_url == "http://s3-only:9000"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert s3.endpoint_url() == "http://mlflow-minio:9000" == s3.client().meta.endpoint_url

    # the fallback alone reaches the store (the MLflow ConfigMap is all a step gets)
    _upload_tree(_bucket(env, "fallback"), "fallback", "d/", tree_a)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", env)
    _assert_same(data.load_source("s3://fallback/d/", _cfg(tmp_path, "x")), data.load_imagefolder(tree_a, 8, 1))


# ------------------------------------------------------------------------------------------ data prep lineage


def _tree_digest(tree: Path, prefix: str, file_hash) -> str:
    """A tree digest the manifest must carry, computed independently: sorted `key<TAB>hash` lines."""
    images = [p for p in _files(tree) if p.suffix == ".png" and p.parent != tree]
    lines = sorted(
        f"{prefix}{p.relative_to(tree).as_posix()}\t{file_hash(p.read_bytes()).hexdigest()}\n" for p in images
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _first_read_only(read_marker):
    """read_marker that answers once per cache folder: a second read (the lineage looked up again after the
    data was loaded) fails the test."""
    seen = set()

    def once(final, uri):
        if (final, uri) in seen:
            pytest.fail(f"the cache marker of {uri} was read twice")
        seen.add((final, uri))
        return read_marker(final, uri)

    return once


def test_prepare_records_s3_lineage_and_matches_local_sources(env, tree_a, tree_b, tmp_path, monkeypatch):
    c = _bucket(env, "prep")
    _upload_tree(c, "prep", "a/", tree_a)
    archive = _zip(tree_b)
    c.put_object(Bucket="prep", Key="b.zip", Body=archive)

    common = {"setup": "cross_dataset", "image_size": 8, "channels": 1, "root": str(tmp_path / "cache")}
    with monkeypatch.context() as m:  # the lineage comes with the fetch, not from a second look at the cache
        m.setattr(s3, "read_marker", _first_read_only(s3.read_marker))  # (which another run may refresh)
        remote = data.prepare(DataConfig(source="s3://prep/a/", target="s3://prep/b.zip", **common), 0, tmp_path / "r")
    local = data.prepare(
        DataConfig(source=f"imagefolder:{tree_a}", target=f"imagefolder:{tree_b}", **common), 0, tmp_path / "l"
    )
    assert remote["content_hash"] == local["content_hash"]
    for task in data.TASKS:
        for key in ("classes", "num_classes", "shape", "counts"):
            assert remote["tasks"][task][key] == local["tasks"][task][key]
        assert "origin" not in local["tasks"][task]
    assert remote["tasks"]["source"]["spec"] == "s3://prep/a/"
    assert remote["tasks"]["source"]["origin"] == {
        "uri": "s3://prep/a/",
        "kind": "tree",
        "objects": N_IMAGES,
        "size": sum(p.stat().st_size for p in _files(tree_a) if p.suffix == ".png" and p.parent != tree_a),
        "etags_sha256": _tree_digest(tree_a, "a/", hashlib.md5),  # single-part uploads: ETag = MD5
        "sha256": _tree_digest(tree_a, "a/", hashlib.sha256),
    }
    assert remote["tasks"]["target"]["origin"] == {
        "uri": "s3://prep/b.zip",
        "kind": "archive",
        "key": "b.zip",
        "etag": hashlib.md5(archive).hexdigest(),  # a single-part upload's ETag is its MD5
        "size": len(archive),
        "sha256": hashlib.sha256(archive).hexdigest(),
    }
    assert json.loads((tmp_path / "r" / "manifest.json").read_text()) == remote

    # class_split: both tasks come from the one s3 source (both trees' six classes), and both record it
    both = tmp_path / "both" / "digits"
    for tree in (tree_a, tree_b):
        for p in _files(tree):
            if p.parent != tree:
                (both / p.relative_to(tree)).parent.mkdir(parents=True, exist_ok=True)
                (both / p.relative_to(tree)).write_bytes(p.read_bytes())
    c.put_object(Bucket="prep", Key="ab.zip", Body=_zip(both))
    split = data.prepare(
        DataConfig(
            source="s3://prep/ab.zip",
            setup="class_split",
            source_classes=[0, 1],
            target_classes=[2, 3, 4],
            image_size=8,
            channels=1,
            root=str(tmp_path / "cache"),
        ),
        0,
        tmp_path / "s",
    )
    assert split["tasks"]["source"]["classes"] == ["0", "1"] and split["tasks"]["target"]["classes"] == ["2", "3", "4"]
    assert split["tasks"]["source"]["origin"] == split["tasks"]["target"]["origin"]
    assert split["tasks"]["source"]["origin"]["uri"] == "s3://prep/ab.zip"


def test_s3_uris_pass_through_local_path_resolution(tmp_path):
    """`with_local_paths` makes local sources absolute for steps in other folders; an s3:// URI is left as it is."""
    from kdflow.config import Config

    cfg = Config(data=DataConfig(source="s3://b/p/", target="s3://b/t.zip", setup="cross_dataset"))
    resolved = cfg.with_local_paths(tmp_path)
    assert (resolved.data.source, resolved.data.target) == ("s3://b/p/", "s3://b/t.zip")
