"""Real servers on loopback for integration tests: PostgreSQL, an S3-compatible moto server, an MLflow server.

Each one is a child process in its own session (so its own process group), listens on 127.0.0.1 only, writes
its output to a log file, and is stopped by the context manager that started it: signal to the group, wait,
SIGKILL whatever is left. `ServerError` carries the end of the server's log, so a start-up failure says why.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
S3_KEY = S3_SECRET = "kdflow-test"  # moto accepts any credentials; only the MLflow server is given them
S3_REGION = "us-east-1"


class ServerError(RuntimeError):
    """A test server failed to start or died; the message ends with its log."""


def free_port() -> int:
    """A port that is free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class Server:
    """A child process in its own process group (start_new_session), its stdout and stderr in `log`."""

    def __init__(self, name: str, cmd: list[str], log: Path, **popen):
        self.name, self.log = name, log
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
            )

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "".join(text.splitlines(keepends=True)[-lines:])

    def fail(self, why: str) -> ServerError:
        return ServerError(f"{self.name}: {why}\n--- last lines of {self.log} ---\n{self.log_tail()}")

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `ready` until it returns True; fail early if the server exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"exited with code {self.proc.returncode} before {what}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise self.fail(f"not {what} after {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Signal the whole process group, wait for the leader, then SIGKILL anything left in the group.
        (PostgreSQL's backends put themselves in groups of their own; the postmaster stops them.)"""
        pgid = self.proc.pid  # leader of its own session, so pid == pgid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


# ------------------------------------------------------------------------------------------------ PostgreSQL


def postgres_bin() -> Path:
    """The folder with initdb and postgres; skips the test when PostgreSQL is not installed."""

    def version(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for d in [*found, os.path.dirname(shutil.which("postgres") or "")]:
        if d and (Path(d) / "initdb").is_file() and (Path(d) / "postgres").is_file():
            return Path(d)
    pytest.skip("PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin or on PATH")


@dataclass(frozen=True)
class Postgres:
    port: int
    database: str
    user: str = "postgres"

    @property
    def url(self) -> str:
        """SQLAlchemy URL for --backend-store-uri. It names the psycopg2 driver: SQLAlchemy 2.1's default for
        postgresql:// is psycopg 3, which is not installed."""
        return f"postgresql+psycopg2://{self.user}@{LOOPBACK}:{self.port}/{self.database}"

    def connect(self):
        import psycopg2

        return psycopg2.connect(host=LOOPBACK, port=self.port, user=self.user, dbname=self.database)


@contextlib.contextmanager
def postgres_server(log_dir: Path, database: str = "mlflow", startup_timeout: float = 60) -> Iterator[Postgres]:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port> with one empty database, trust auth.

    PostgreSQL refuses to run as root, so under root initdb and postgres run as the `postgres` user in a temp
    dir it owns (not pytest's tmp_path, which only root may enter)."""
    pg_bin = postgres_bin()
    import psycopg2

    root = Path(tempfile.mkdtemp(prefix="kdflow-pg-"))
    as_user: dict = {}
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    server = None
    try:
        init = subprocess.run(
            [str(pg_bin / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "--no-sync"],
            capture_output=True,
            text=True,
            cwd=root,
            env=env,
            timeout=120,
            **as_user,
        )
        if init.returncode != 0:
            raise ServerError(f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}{init.stderr[-2000:]}")
        port = free_port()
        settings = {
            "listen_addresses": LOOPBACK,
            "port": port,
            "unix_socket_directories": root,
            "fsync": "off",  # a test database: durability is not the point, speed is
            "full_page_writes": "off",
        }
        cmd = [str(pg_bin / "postgres"), "-D", str(root / "data")]
        for k, v in settings.items():
            cmd += ["-c", f"{k}={v}"]
        server = Server("postgres", cmd, log_dir / "postgres.log", cwd=root, env=env, **as_user)

        def accepting() -> bool:
            try:
                psycopg2.connect(
                    host=LOOPBACK, port=port, user="postgres", dbname="postgres", connect_timeout=2
                ).close()
                return True
            except psycopg2.OperationalError:
                return False

        server.wait_until(accepting, startup_timeout, "accepting connections")
        admin = psycopg2.connect(host=LOOPBACK, port=port, user="postgres", dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        admin.close()
        yield Postgres(port, database)
    finally:
        if server is not None:
            server.stop(signal.SIGINT)  # PostgreSQL's "fast" shutdown: ends sessions instead of waiting for them
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ S3 (moto)


@dataclass(frozen=True)
class S3:
    endpoint: str
    bucket: str

    def client(self):
        """A boto3 client with explicit test credentials (nothing is taken from the environment)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name=S3_REGION,
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@contextlib.contextmanager
def s3_server(log_dir: Path, bucket: str = "kdflow", startup_timeout: float = 30) -> Iterator[S3]:
    """moto's S3-compatible server as its own process on 127.0.0.1:<free port>, with one empty bucket."""
    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    server = Server(
        "moto", [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)], log_dir / "moto.log"
    )
    try:
        server.wait_until(lambda: _http_ok(f"{endpoint}/moto-api/"), startup_timeout, "answering HTTP")
        s3 = S3(endpoint, bucket)
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- MLflow server


@dataclass(frozen=True)
class MlflowServer:
    url: str

    def api(self, path: str, payload: dict | None = None, **query: str) -> dict:
        """Call the REST API with plain HTTP: POST `payload` as JSON, else GET with `query`."""
        url = f"{self.url}/api/2.0/mlflow/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            raise AssertionError(
                f"{req.get_method()} {url} → {err.code}: {err.read().decode(errors='replace')}"
            ) from None


@contextlib.contextmanager
def mlflow_server(
    log_dir: Path, backend_store_uri: str, s3: S3, prefix: str = "mlartifacts", startup_timeout: float = 120
) -> Iterator[MlflowServer]:
    """`mlflow server --workers 1` on 127.0.0.1:<free port>, runs in `backend_store_uri`, artifacts proxied to
    s3://<bucket>/<prefix> (the server's default --serve-artifacts): only this process gets S3 credentials,
    clients upload and download through the server (mlflow-artifacts:/ URIs)."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job runner processes beside the web server
        MLFLOW_S3_ENDPOINT_URL=s3.endpoint,
        AWS_ACCESS_KEY_ID=S3_KEY,
        AWS_SECRET_ACCESS_KEY=S3_SECRET,
        AWS_DEFAULT_REGION=S3_REGION,
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    cmd = [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", LOOPBACK, "--port", str(port)]
    cmd += ["--backend-store-uri", backend_store_uri, "--artifacts-destination", f"s3://{s3.bucket}/{prefix}"]
    server = Server("mlflow server", cmd, log_dir / "mlflow-server.log", env=env, cwd=log_dir)
    try:
        server.wait_until(lambda: _http_ok(f"{url}/health"), startup_timeout, "healthy")
        yield MlflowServer(url)
    finally:
        server.stop()
