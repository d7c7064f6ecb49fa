"""Bad input to `kdflow run` that can be known before training fails in seconds, with one line naming it and a
non-zero exit, and nothing written: no home, no store, no run. Credentials in a tracking URI are never printed."""

from __future__ import annotations

import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kdflow import tracking

SECRET = "s3cr3t-pw-4242"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def _kdflow(*args: str, cwd: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", *tracking.CREDENTIAL_ENV)}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kdflow.cli", "run", *args],
        capture_output=True, text=True, cwd=cwd, env={**base, **(env or {})}, timeout=120,
    )  # fmt: skip
    return proc, time.monotonic() - t0


def test_split_credentials_and_redact():
    assert tracking.split_credentials("http://alice:pw%40x@mlflow:5000/a") == ("http://mlflow:5000/a", "alice", "pw@x")
    assert tracking.split_credentials("https://tok@host") == ("https://host", "tok", None)
    assert tracking.split_credentials("sqlite:////tmp/x.db") == ("sqlite:////tmp/x.db", None, None)
    assert tracking.split_credentials("http://host:5000") == ("http://host:5000", None, None)
    assert tracking.redact("see http://u:p@h:1/x and s3://k:s@b/o") == "see http://***@h:1/x and s3://***@b/o"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "distill.train.epochs=[1"], "error: --set 'distill.train.epochs=[1': the value is not valid YAML"),
        (["--set", "registry.alias=latest"], "registry.alias: Value error, MLflow reserves the alias 'latest'"),
        (["--set", "registry.model_name=team/student"], "MLflow model names cannot contain '/' or ':'"),
        (["--home", "{file}"], "error: --home {file}: not a directory"),
        (
            ["--tracking-uri", "http://alice:" + SECRET + "@127.0.0.1:{port}"],
            "error: MLflow tracking server http://127.0.0.1:{port} is not reachable",
        ),
        (
            ["--set", "data.source=mnistt"],
            "error: data.source: unknown data source 'mnistt': use digits, mnist-idx:<dir>, usps:<dir>",
        ),
        (["--set", "data.source=mnist-idx:{file}"], "error: data.source: mnist-idx directory not found: {file}"),
        (
            ["--set", "data.source=mnist-idx:{tmp}"],
            "error: data.source: no '*-images-idx3-ubyte[.gz]' + '*-labels-idx1-ubyte[.gz]' pair in {tmp}",
        ),
        (
            ["--set", "data.setup=cross_dataset", "--set", "data.target=usps:{tmp}"],
            "error: data.target: no usps.bz2 or usps.t.bz2 in {tmp}",
        ),
        (
            ["--set", "data.setup=cross_dataset", "--set", "data.target=imagefolder:{tmp}/nope"],
            "error: data.target: imagefolder path not found: {tmp}/nope",
        ),
        (
            ["--set", "data.setup=cross_dataset", "--set", "data.target=imagefolder:{tmp}"],
            "error: data.target: imagefolder:{tmp} needs data.image_size (images come in any size)",
        ),
        (
            ["--tracking-uri", "ftp://127.0.0.1/x"],
            "error: tracking URI ftp://127.0.0.1/x: MLflow has no tracking store for the scheme 'ftp'",
        ),
    ],
)  # fmt: skip
def test_bad_input_fails_in_seconds_naming_it_and_writes_nothing(tmp_path, args, message):
    file, port = tmp_path / "a-file", _free_port()
    file.write_text("not a folder")
    fill = {"file": str(file), "port": str(port), "tmp": str(tmp_path)}
    proc, took = _kdflow(*[a.format(**fill) for a in args], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert message.format(**fill) in " ".join(out.split()), out
    assert "Traceback" not in out and SECRET not in out
    assert took < 30  # the interpreter and imports; no training, no store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no kdflow-home, no mlflow.db


def _idx(path: Path, arr: np.ndarray, *, gz: bool = True) -> None:
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def _mnist(tmp: Path, labels: list[int], images: int | None = None) -> Path:
    """A small MNIST-format folder: random 28x28 images (`images` of them, default one per label) and labels."""
    d = tmp / "mnist"
    d.mkdir()
    n = images if images is not None else len(labels)
    _idx(d / "t10k-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 256, (n, 28, 28)))
    _idx(d / "t10k-labels-idx1-ubyte.gz", np.array(labels))
    return d


def _tree(tmp: Path, classes: dict[str, int]) -> Path:
    """An image folder with `classes[name]` 8x8 PNGs per class folder."""
    from PIL import Image

    d = tmp / "tree"
    for name, k in classes.items():
        (d / name).mkdir(parents=True)
        for i in range(k):
            Image.fromarray(np.full((8, 8), 40 * i % 256, np.uint8)).save(d / name / f"{i}.png")
    return d


def _cut(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


LABELS = [i % 10 for i in range(200)]
ON_TREE = ["--set", "data.source=digits", "--set", "data.setup=cross_dataset", "--set", "data.image_size=8",
           "--set", "data.channels=1", "--set", "data.target=imagefolder:{tree}"]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (
            lambda t: _mnist(t, [*LABELS[:-1], 42]), ["--set", "data.source=mnist-idx:{mnist}"],
            "error: source task (mnist-idx:{mnist}): label 42 is out of range for its 10 classes (labels must be 0 "
            "to 9)",
        ),
        (
            lambda t: _cut(_mnist(t, LABELS) / "t10k-images-idx3-ubyte.gz"), ["--set", "data.source=mnist-idx:{mnist}"],
            "error: {mnist}/t10k-images-idx3-ubyte.gz: unreadable (EOFError: Compressed file ended before the "
            "end-of-stream marker was reached)",
        ),
        (
            lambda t: _mnist(t, LABELS, images=150), ["--set", "data.source=mnist-idx:{mnist}"],
            "error: {mnist}/t10k-images-idx3-ubyte.gz has 150 images but {mnist}/t10k-labels-idx1-ubyte.gz has 200 "
            "labels",
        ),
        (
            lambda t: _tree(t, {"cat": 6}), ON_TREE,
            "error: target task (imagefolder:{tree}): only one class ('cat') has images; classification needs at "
            "least 2",
        ),
        (
            lambda t: None,
            ["--set", "data.setup=class_split", "--set", "data.source_classes=[0,1,2,3,4]",
             "--set", "data.target_classes=[5,42]"],
            "error: class indices [42] out of range for a dataset with 10 classes",
        ),
    ],
    ids=["label-42", "gzip-cut", "count-mismatch", "one-class", "class-index"],
)  # fmt: skip
def test_bad_data_fails_before_the_pipeline_naming_it(tmp_path, make, args, message):
    """What data prep would find wrong is found before the pipeline starts (`kdflow.data.check`): one line,
    exit 2, no traceback, no home or store written."""
    make(tmp_path)
    fill = {"mnist": str(tmp_path / "mnist"), "tree": str(tmp_path / "tree")}
    before = sorted(p.name for p in tmp_path.iterdir())
    proc, took = _kdflow("--home", str(tmp_path / "home"), *[a.format(**fill) for a in args], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert message.format(**fill) in " ".join(out.split()), out
    assert "Traceback" not in out and "pipeline failed" not in out, out
    assert took < 60  # the interpreter, torch and reading the data; no pipeline
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no kdflow-home, no mlflow.db


def test_credentials_in_the_tracking_uri_move_to_the_environment(monkeypatch):
    """What `kdflow run` hands its steps: the URI without user-info, the user-info in MLflow's variables."""
    from typer.testing import CliRunner

    from kdflow import cli

    seen = {}

    def fake_run_local(cfg, home, uri, verbose, resume=False):
        seen["uri"] = uri
        seen["env"] = {v: os.environ.get(v) for v in tracking.CREDENTIAL_ENV}
        raise SystemExit(0)

    monkeypatch.setattr("kdflow.pipelines.local.run_local", fake_run_local)
    monkeypatch.setattr(tracking, "check_reachable", lambda uri, timeout_s=10.0: None)
    for var in tracking.CREDENTIAL_ENV:
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(cli.app, ["run", "--tracking-uri", f"http://alice:{SECRET}@mlflow.example:5000"])
    assert seen == {
        "uri": "http://mlflow.example:5000",
        "env": {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": SECRET},
    }
    assert SECRET not in result.output and "MLflow at http://mlflow.example:5000" in " ".join(result.output.split())


def test_credentials_in_config_values_never_reach_mlflow_params():
    from kdflow import secrets
    from kdflow.config import load_config

    cfg = load_config(
        None,
        {
            "data.root": f"https://reader:{SECRET}@files.example/datasets",
            "distill.students": [{"name": "s", "arch": "cnn", "arch_kwargs": {"width": 4, "api_token": SECRET}}],
        },
    )
    flat = cfg.flat()
    assert SECRET not in json.dumps(flat)
    assert flat["data.root"] == "https://***@files.example/datasets"
    assert '"api_token": "' + SECRET not in flat["distill.students"]
    assert secrets.redact_value("teacher.arch_kwargs.password", "x") == "***"
    assert secrets.redact_value("data.source", "s3://bucket/key") == "s3://bucket/key"


def test_scrub_and_to_env_take_the_same_values_for_credentials(tmp_path):
    """A config without credentials scrubs to itself, so `kdflow run --resume` with no -c/--set continues it:
    `cluster.s3_secret` and `cluster.secret_keys` name a Kubernetes Secret, `${env:NAME}` names a variable."""
    from kdflow import secrets
    from kdflow.config import Config, load_config
    from kdflow.pipelines.local import LAST_FILE, recorded_config

    plain = load_config(None, {"data.root": "${env:DATA_ROOT}", "teacher.arch_kwargs": {"token": "${env:TOK}"}})
    data = plain.model_dump(mode="json")
    assert data["cluster"]["s3_secret"] == "kdflow-s3" and data["cluster"]["secret_keys"] == [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]
    assert secrets.scrub(data) == data and secrets.to_env(data) == (data, {})
    with_one = load_config(None, {"teacher.arch_kwargs": {"token": SECRET}}).model_dump(mode="json")
    assert secrets.scrub(with_one)["teacher"]["arch_kwargs"] == {"token": "***"}
    assert list(secrets.to_env(with_one)[1].values()) == [SECRET]
    # what a local run records (`run_local`), read back by --resume
    (tmp_path / LAST_FILE).write_text(json.dumps({"config": secrets.scrub(data), "credentials": False}))
    assert recorded_config(tmp_path) == Config.model_validate(data)


def test_log_params_redacts(monkeypatch):
    import mlflow

    from kdflow import tracking

    sent = {}
    monkeypatch.setattr(mlflow, "log_params", lambda params: sent.update(params))
    tracking.log_params({"student.arch_kwargs": {"secret_key": SECRET}, "data.source": f"http://u:{SECRET}@h/x"})
    assert SECRET not in json.dumps(sent) and sent["data.source"] == "http://***@h/x"


def test_config_credentials_travel_by_environment_and_come_back_in_the_step(monkeypatch):
    from kdflow import secrets
    from kdflow.config import ConfigError, config_from_json, load_config

    cfg = load_config(
        overrides={
            "distill.students": [{"name": "s", "arch": "cnn", "arch_kwargs": {"width": 4, "api_token": SECRET}}],
            "data.source": f"http://alice:{SECRET}@data.example/digits.tgz",
        }
    )
    as_json = cfg.model_dump(mode="json")
    refs, env = secrets.to_env(as_json)
    text = json.dumps(refs)
    assert SECRET not in text and len(env) == 2  # the token, and the URI's user-info
    assert sorted(env.values()) == sorted([SECRET, f"alice:{SECRET}"])
    name = next(k for k, v in env.items() if v == SECRET)
    assert refs["distill"]["students"][0]["arch_kwargs"]["api_token"] == "${env:" + name + "}"
    assert secrets.to_env(refs) == (refs, {})  # references stay references
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert config_from_json(text) == cfg  # what the step sees: the config itself
    monkeypatch.delenv(name)
    with pytest.raises(ConfigError, match=f"the environment variable {name}, which is not set"):
        config_from_json(text)


def test_compile_refuses_a_credential_in_the_config(tmp_path):
    from kdflow.config import ConfigError, load_config
    from kdflow.pipelines.compile import compile_pipeline

    students = [{"name": "s", "arch": "cnn", "arch_kwargs": {"width": 4, "api_token": SECRET}}]
    cfg = load_config(overrides={"distill.students": students})
    with pytest.raises(ConfigError, match=r"^distill.students holds a credential"):
        compile_pipeline(cfg, tmp_path / "p.yaml")
    assert not (tmp_path / "p.yaml").exists()
    students[0]["arch_kwargs"]["api_token"] = "${env:MY_TOKEN}"  # named, not written: fine
    assert compile_pipeline(load_config(overrides={"distill.students": students}), tmp_path / "p.yaml").is_file()


def test_a_corrupt_sqlite_store_fails_in_seconds_naming_it_and_is_left_as_it_was(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    junk = b"SQLite format 3\x00" + bytes(range(256)) * 16
    (home / "mlflow.db").write_bytes(junk)
    proc, took = _kdflow("--home", str(home), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert out.strip().splitlines()[-1] == (
        f"error: MLflow store {home / 'mlflow.db'} is not a readable SQLite database (file is not a database)"
    ), out
    assert "Traceback" not in out and took < 30
    assert sorted(p.name for p in home.iterdir()) == ["mlflow.db"] and (home / "mlflow.db").read_bytes() == junk


def test_a_pipeline_package_that_is_not_yaml_is_one_line(tmp_path):
    from kdflow import submit

    path = tmp_path / "pipe.yaml"
    path.write_text("this: is not\n- a pipeline\n")
    with pytest.raises(submit.SubmitError) as err:
        submit.plan(path, {}, None, None, None)
    assert str(err.value) == (
        f"pipeline package {path} is not valid YAML: expected <block end>, but found '-' at line 2, column 1"
    )
