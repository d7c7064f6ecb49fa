"""Datasets in an S3-compatible object store (AWS S3, MinIO): fetched into a local cache as an ImageFolder tree.

`s3://bucket/prefix/` is a tree of class folders under the prefix; `s3://bucket/key.tar` (`.tar.gz`, `.tgz`,
`.tar.bz2`, `.tar.xz`, `.zip`) is an archive holding such a tree, possibly inside one top-level folder. Only image
files are fetched. The cache (`<cache_root>/<bucket>/<name>-<hash of the URI>/`) keeps a marker with every object's
ETag and SHA-256: an unchanged object is never downloaded twice, and the marker is the lineage written into the
data manifest. A new cache version is built in a temporary sibling folder and renamed into place, so an interrupted
download never leaves a half-filled cache behind.

Credentials and endpoint come from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL); MLFLOW_S3_ENDPOINT_URL is the fallback endpoint, so the ConfigMap that
points MLflow at MinIO serves data prep too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kdflow.errors import DataError
from kdflow.runtime import filelock

SCHEME = "s3://"
# What torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS); other files are never fetched.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (*TAR_SUFFIXES, ".zip")
MARKER = "kdflow-s3.json"
MARKER_VERSION = 1
ENDPOINT_FALLBACK = "MLFLOW_S3_ENDPOINT_URL"
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one dataset fetch may bring in: total image bytes, image files and bytes per file (an archive is
    checked on its members' declared sizes before anything is extracted, a tree on its listing before anything
    is downloaded, and an archive object itself against `total_bytes`). Operators set them by environment:
    KDFLOW_S3_MAX_BYTES, KDFLOW_S3_MAX_FILES, KDFLOW_S3_MAX_FILE_BYTES."""

    total_bytes: int = 64 << 30
    files: int = 5_000_000
    file_bytes: int = 256 << 20

    @classmethod
    def from_env(cls) -> Limits:
        out = {}
        for field, var in (("total_bytes", "MAX_BYTES"), ("files", "MAX_FILES"), ("file_bytes", "MAX_FILE_BYTES")):
            raw = os.environ.get(f"KDFLOW_S3_{var}")
            if raw is None:
                continue
            if not raw.isdigit() or int(raw) < 1:
                raise DataError(f"KDFLOW_S3_{var}={raw!r}: expected a whole number of 1 or more")
            out[field] = int(raw)
        return cls(**out)

    def check(self, uri: str, sizes: dict[str, int], what: str) -> None:
        """Refuse a fetch whose files (name → bytes) exceed a limit, naming the limit and the largest file."""
        if len(sizes) > self.files:
            raise DataError(
                f"{uri}: {what} holds {len(sizes):,} image files, over the limit of {self.files:,} "
                "(KDFLOW_S3_MAX_FILES)"
            )
        if sizes:
            name, biggest = max(sizes.items(), key=lambda kv: kv[1])
            if biggest > self.file_bytes:
                raise DataError(
                    f"{uri}: {what} member {name!r} is {biggest:,} bytes, over the per-file limit of "
                    f"{self.file_bytes:,} (KDFLOW_S3_MAX_FILE_BYTES)"
                )
        total = sum(sizes.values())
        if total > self.total_bytes:
            raise DataError(
                f"{uri}: {what} holds {total:,} bytes of images, over the limit of {self.total_bytes:,} "
                "(KDFLOW_S3_MAX_BYTES)"
            )


@dataclass(frozen=True)
class Location:
    """A parsed `s3://bucket/key` URI; `key` is a prefix ending in '/' (or empty) for a tree."""

    uri: str
    bucket: str
    key: str

    @property
    def is_archive(self) -> bool:
        return self.key.lower().endswith(ARCHIVE_SUFFIXES)

    @property
    def canonical(self) -> str:
        """One spelling per location, as the cache's marker records it: `s3://b/digits` is `s3://b/digits/`."""
        return f"{SCHEME}{self.bucket}/{self.key}"


@dataclass
class Fetched:
    """The local ImageFolder root of a fetched URI, its lineage, and the keys this call actually downloaded."""

    root: Path
    lineage: dict
    downloaded: list[str]


def is_s3_uri(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(SCHEME)


def parse_uri(uri: str) -> Location:
    """`s3://bucket/prefix[/]` → a tree prefix ending in '/'; `s3://bucket/x.tar.gz` → an archive key."""
    if not is_s3_uri(uri):
        raise DataError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(SCHEME) :].partition("/")
    if not _BUCKET.match(bucket):
        raise DataError(f"{uri}: {bucket!r} is not a valid bucket name (use s3://<bucket>/<prefix>/ or .../<archive>)")
    loc = Location(uri, bucket, key)
    if key and not loc.is_archive and not key.endswith("/"):
        loc = Location(uri, bucket, key + "/")  # `s3://b/digits` means the folder, not also `digits-old/`
    return loc


def cache_dir(loc: Location, cache_root: str | Path) -> Path:
    """One folder per URI: readable name plus a hash, so `a/` and `a/b/` never share (or nest) a cache."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", loc.key.strip("/"))[-80:].lstrip(".") or "_bucket"
    digest = hashlib.sha256(f"{loc.bucket}/{loc.key}".encode()).hexdigest()[:12]
    return Path(cache_root).expanduser() / loc.bucket / f"{name}-{digest}"


def endpoint_url() -> str | None:
    """The endpoint to pass to boto3: None when boto3 finds one itself (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL)."""
    if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        return None
    return os.environ.get(ENDPOINT_FALLBACK) or None


def client():
    """An S3 client from boto3's standard chain (credentials, region, retries), with the fallback endpoint.

    A fresh session each time, as boto3's default session keeps the credentials it first found; the sessions share
    one loader of botocore's (static) service models, which is most of a session's start-up cost."""
    import boto3
    import botocore.session

    core = botocore.session.Session()
    core.register_component("data_loader", _model_loader(core.get_config_variable("data_path")))
    return boto3.session.Session(botocore_session=core).client("s3", endpoint_url=endpoint_url())


@functools.cache
def _model_loader(data_path: str | None):
    import botocore.loaders

    return botocore.loaders.create_loader(data_path)


# ---------------------------------------------------------------------------------------------- fetching


def fetch(uri: str, cache_root: str | Path, *, offline: bool = False, page_size: int = 1000) -> Fetched:
    """Make the local cache of `uri` current and return its ImageFolder root.

    With `offline`, the store is not contacted: the cached copy is used as it is, or a DataError says there is none.
    """
    loc = parse_uri(uri)
    final = cache_dir(loc, cache_root)
    with _locked(final):
        if offline:
            marker = read_marker(final, loc.canonical)
            if marker is None:
                raise DataError(f"{uri} is not in the local cache {final} and data.download is false")
            return Fetched(final / marker["root"], lineage(marker), [])
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = client()
        try:
            if loc.is_archive:
                return _fetch_archive(s3, loc, final)
            return _fetch_tree(s3, loc, final, page_size)
        except ClientError as err:
            raise _client_error(s3, loc, err) from None
        except BotoCoreError as err:
            raise _botocore_error(s3, loc, err) from None


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    """One fetch of a location at a time among the processes sharing the cache (`kdflow.runtime.filelock`). Under the
    lock, leftovers of a fetch that was killed mid-way (its staging folder, or the previous version it was
    swapping out) are removed."""
    with filelock.exclusive(final.parent / f"{final.name}.lock"):
        for stale in [*final.parent.glob(f"{final.name}.tmp-*"), *final.parent.glob(f"{final.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        yield


def read_marker(final: Path, uri: str) -> dict | None:
    """The marker of a complete cache of `uri`, or None (no cache, or one of another format)."""
    try:
        marker = json.loads((final / MARKER).read_text())
    except (OSError, ValueError):
        return None
    root = marker.get("root") if isinstance(marker, dict) else None
    if marker.get("version") != MARKER_VERSION or marker.get("uri") != uri or not root or not (final / root).is_dir():
        return None
    return marker


def lineage(marker: dict) -> dict:
    """URI, ETag(s) and content hash: enough to tell later whether the store still holds the same data."""
    objects = marker["objects"]
    if marker["kind"] == "archive":
        ((key, o),) = objects.items()
        return {
            "uri": marker["uri"],
            "kind": "archive",
            "key": key,
            "etag": o["etag"],
            "size": o["size"],
            "sha256": o["sha256"],
        }
    keys = sorted(objects)
    return {
        "uri": marker["uri"],
        "kind": "tree",
        "objects": len(keys),
        "size": sum(objects[k]["size"] for k in keys),
        "etags_sha256": _digest(f"{k}\t{objects[k]['etag']}\n" for k in keys),
        "sha256": _digest(f"{k}\t{objects[k]['sha256']}\n" for k in keys),
    }


def _digest(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
    return h.hexdigest()


def _fetch_tree(s3, loc: Location, final: Path, page_size: int) -> Fetched:
    listing = _list_images(s3, loc, page_size)  # key → (relative path, etag)
    old = read_marker(final, loc.canonical)
    old_objects = old["objects"] if old and old["kind"] == "tree" else {}
    if old and {k: o["etag"] for k, o in old_objects.items()} == {k: e for k, (_, e) in listing.items()}:
        return Fetched(final / old["root"], lineage(old), [])
    with _staging(final) as tmp:
        objects, downloaded = {}, []
        for key, (rel, etag) in sorted(listing.items()):
            dest = tmp / "tree" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            prev = old_objects.get(key)
            if prev and prev["etag"] == etag and _reuse(final / old["root"] / rel, dest):
                objects[key] = prev
            else:
                objects[key] = _download(s3, loc.bucket, key, dest)
                downloaded.append(key)
        marker = _install(tmp, final, {"uri": loc.canonical, "kind": "tree", "root": "tree", "objects": objects})
    return Fetched(final / marker["root"], lineage(marker), downloaded)


def _list_images(s3, loc: Location, page_size: int) -> dict[str, tuple[str, str]]:
    """Image objects under the prefix that sit inside a class folder, by key; unsafe keys are an error."""
    listing, sizes, seen, loose = {}, {}, 0, 0
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=loc.bucket, Prefix=loc.key, PaginationConfig={"PageSize": page_size}
    )
    for page in pages:
        for obj in page.get("Contents", []):
            seen += 1
            key = obj["Key"]
            rel = key[len(loc.key) :]
            if key.endswith("/") or not rel.lower().endswith(IMAGE_EXTENSIONS):
                continue
            parts = _safe_parts(rel, f"{loc.uri}: object key {key!r}")
            if any(p.startswith(".") for p in parts):
                continue  # hidden files and folders: ImageFolder would take a hidden folder for a class
            if len(parts) < 2:
                loose += 1  # ImageFolder reads class folders only
                continue
            listing[key] = ("/".join(parts), obj["ETag"].strip('"'))
            sizes[key] = int(obj.get("Size", 0))
    if not listing:
        if not seen:
            raise DataError(f"{loc.uri}: no objects under this prefix (empty, or a typo in the prefix?)")
        where = f"; {loose} images lie directly under the prefix, not in class folders" if loose else ""
        raise DataError(
            f"{loc.uri}: none of its {seen} objects is an image in a class folder "
            f"({loc.key}<class>/<name>{'|'.join(IMAGE_EXTENSIONS)}){where}"
        )
    Limits.from_env().check(loc.uri, sizes, "the prefix")  # before any download
    return listing


def _fetch_archive(s3, loc: Location, final: Path) -> Fetched:
    head = s3.head_object(Bucket=loc.bucket, Key=loc.key)
    etag, limits = head["ETag"].strip('"'), Limits.from_env()
    if int(head.get("ContentLength", 0)) > limits.total_bytes:
        raise DataError(
            f"{loc.uri}: the archive is {int(head['ContentLength']):,} bytes, over the limit of "
            f"{limits.total_bytes:,} (KDFLOW_S3_MAX_BYTES)"
        )
    old = read_marker(final, loc.canonical)
    if old and old["kind"] == "archive" and old["objects"].get(loc.key, {}).get("etag") == etag:
        return Fetched(final / old["root"], lineage(old), [])
    with _staging(final) as tmp:
        archive = tmp / ("archive" + next(s for s in ARCHIVE_SUFFIXES if loc.key.lower().endswith(s)))
        info = _download(s3, loc.bucket, loc.key, archive)
        count = _extract(archive, tmp / "tree", loc.uri)
        archive.unlink()
        if count == 0:
            raise DataError(f"{loc.uri}: the archive holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        root = _tree_root(tmp / "tree")
        if not any(p.is_dir() for p in root.iterdir()):
            raise DataError(f"{loc.uri}: the archive's images are not inside class folders (<class>/<image>)")
        marker = {"uri": loc.canonical, "kind": "archive", "root": root.relative_to(tmp).as_posix(), "objects": {}}
        marker["objects"][loc.key] = info
        marker = _install(tmp, final, marker)
    return Fetched(final / marker["root"], lineage(marker), [loc.key])


def _download(s3, bucket: str, key: str, dest: Path) -> dict:
    """Stream one object to `dest`; its ETag is the one of the bytes actually read."""
    resp = s3.get_object(Bucket=bucket, Key=key)
    h, size = hashlib.sha256(), 0
    with open(dest, "wb") as f:
        for chunk in resp["Body"].iter_chunks(_CHUNK):
            f.write(chunk)
            h.update(chunk)
            size += len(chunk)
    return {"etag": resp["ETag"].strip('"'), "size": size, "sha256": h.hexdigest()}


def _reuse(src: Path, dest: Path) -> bool:
    """Carry an unchanged file over from the previous cache version (hard link, else copy)."""
    if not src.is_file():
        return False
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
    return True


class _staging:
    """A temporary sibling of the cache folder, removed unless it was installed."""

    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _install(tmp: Path, final: Path, marker: dict) -> dict:
    """Write the marker last, then swap the staged folder in for the old cache version."""
    marker = {"version": MARKER_VERSION, **marker}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        theirs = read_marker(final, marker["uri"])
        if theirs is None:
            if old is not None and not final.exists():
                os.rename(old, final)  # keep the last good version rather than none
            raise
        marker = theirs  # another process (a run sharing this cache) installed a complete version meanwhile
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return marker


# ------------------------------------------------------------------------------------------------ archives


def _safe_parts(name: str, what: str) -> list[str]:
    """Path components of a member or key name; absolute names, drive letters, '..' and empty parts are refused."""
    stripped = name.rstrip("/")
    parts = [p for p in stripped.split("/") if p != "."] if stripped else []
    if (
        "\0" in name
        or "\\" in name
        or name.startswith("/")
        or re.match(r"^[A-Za-z]:", name)
        or ".." in parts
        or "" in parts
    ):
        raise DataError(f"{what} is not a safe relative path (it could leave the dataset folder)")
    return parts


def _wanted(parts: list[str]) -> bool:
    return (
        bool(parts)
        and parts[-1].lower().endswith(IMAGE_EXTENSIONS)
        and not any(p.startswith(".") or p == "__MACOSX" for p in parts)
    )


def _extract(archive: Path, dest: Path, uri: str) -> int:
    """Extract the image files of a tar or zip archive into `dest`; any unsafe member rejects the whole archive."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.endswith(".zip"):
            return _extract_zip(archive, dest, uri)
        return _extract_tar(archive, dest, uri)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{uri}: not a readable {archive.name.partition('.')[2]} archive ({err})") from None


def _extract_tar(archive: Path, dest: Path, uri: str) -> int:
    if not hasattr(tarfile, "data_filter"):
        raise DataError(f"{uri}: safe tar extraction needs Python 3.10.12+ / 3.11.4+ (tarfile filter='data')")
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        chosen = []
        for m in members:
            parts = _safe_parts(m.name, f"{uri}: archive member {m.name!r}")
            try:
                tarfile.data_filter(m, str(dest))
            except tarfile.FilterError as err:
                raise DataError(f"{uri}: archive member {m.name!r} is unsafe ({err})") from None
            if m.isfile() and _wanted(parts):
                chosen.append(m)
        Limits.from_env().check(uri, {m.name: m.size for m in chosen}, "the archive")  # before extracting
        tar.extractall(dest, members=chosen, filter="data")
    return len(chosen)


def _extract_zip(archive: Path, dest: Path, uri: str) -> int:
    count = 0
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        checked = [(i, _safe_parts(i.filename, f"{uri}: archive member {i.filename!r}")) for i in infos]
        wanted = {i.filename: i.file_size for i, parts in checked if not i.is_dir() and _wanted(parts)}
        Limits.from_env().check(uri, wanted, "the archive")  # declared sizes, before extracting; zipfile reads
        for info, parts in checked:  # no more than a member declares
            if info.is_dir() or not _wanted(parts):
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            count += 1
    return count


def _tree_root(tree: Path) -> Path:
    """Descend through single wrapping folders (`digits/0/a.png` → `digits`) down to the class folders."""
    root = tree
    while True:
        entries = list(root.iterdir())
        if len(entries) == 1 and entries[0].is_dir() and any(p.is_dir() for p in entries[0].iterdir()):
            root = entries[0]
        else:
            return root


# -------------------------------------------------------------------------------------------------- errors


def _client_error(s3, loc: Location, err) -> DataError:
    code = str(err.response.get("Error", {}).get("Code", ""))
    endpoint = s3.meta.endpoint_url
    if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and not _bucket_exists(s3, loc.bucket)):
        reason = f"bucket {loc.bucket!r} does not exist at {endpoint}"
    elif code in ("NoSuchKey", "404", "NotFound"):
        reason = f"no object {loc.key!r} in bucket {loc.bucket!r} at {endpoint}"
    elif code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        reason = f"access denied ({code}) at {endpoint}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    else:
        reason = f"{code or 'error'} at {endpoint}: {err}"
    return DataError(f"cannot read {loc.uri}: {reason}")


def _bucket_exists(s3, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as err:
        return str(err.response.get("Error", {}).get("Code", "")) not in ("404", "NoSuchBucket", "NotFound")
    return True


def _botocore_error(s3, loc: Location, err) -> DataError:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        reason = f"no S3 credentials ({err}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    elif isinstance(err, EndpointConnectionError):
        reason = (
            f"cannot reach the S3 endpoint {s3.meta.endpoint_url}: set AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL "
            f"or {ENDPOINT_FALLBACK}"
        )
    else:
        reason = str(err)
    return DataError(f"cannot read {loc.uri}: {reason}")
