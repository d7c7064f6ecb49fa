"""`kdflow submit` against a KFP API stand-in on loopback: what kfp.Client really sends for runs, experiments,
recurring runs and auth, how --wait follows a run, and that bad input fails before any request."""

from __future__ import annotations

import json
import re
import socket

import pytest
import yaml
from kfp.client.client import Client
from typer.testing import CliRunner

from kdflow import submit
from kdflow.cli import app
from kdflow.config import Config, load_config
from kdflow.pipelines.compile import compile_pipeline, pipeline_arguments
from tests.helpers.kfp_standin import KfpStandIn
from tests.helpers.pipeline import all_tasks

ENV = (
    "KF_PIPELINES_TOKEN",
    "KF_PIPELINES_SA_TOKEN_PATH",
    "KF_PIPELINES_ENDPOINT",
    "KF_PIPELINES_UI_ENDPOINT",
)


@pytest.fixture
def kfp_api(tmp_path, monkeypatch):
    """A fresh stand-in per test; no ambient KFP settings, token files or kfp context from this machine."""
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(submit, "SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))
    monkeypatch.setattr(submit, "POD_NAMESPACE_PATH", str(tmp_path / "no-pod-namespace"))
    monkeypatch.setattr(Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    server = KfpStandIn().start()
    try:
        yield server
    finally:
        server.stop()


def kdflow_submit(*args: str):
    return CliRunner().invoke(app, ["submit", *args])


def expected_spec(cfg: Config, tmp_path) -> dict:
    """The run's pipeline_spec as kfp.Client sends it: the IR, wrapped with the platform spec when there is one."""
    docs = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / "expected.yaml").read_text()))
    return docs[0] if len(docs) == 1 else {"pipeline_spec": docs[0], "platform_spec": docs[1]}


def ir(pipeline_spec: dict) -> dict:
    return pipeline_spec.get("pipeline_spec", pipeline_spec)


def test_run_carries_the_compiled_config_parameters_and_token(kfp_api, tmp_path):
    kfp_api.token = "s3cret"
    result = kdflow_submit(
        *("--host", kfp_api.url, "--token", "s3cret", "--run-name", "nightly-1"),
        *("--set", "distill.train.epochs=7", "--set", "experiment=kd-nightly"),
        *("--param", "tracking_uri=http://mlflow.kdflow:5000", "--param", "candidates=[cnn4-kd, cnn8-ce]"),
    )
    assert result.exit_code == 0, result.output
    cfg = load_config(None, {"distill.train.epochs": 7, "experiment": "kd-nightly"})

    (created,) = kfp_api.calls("POST", "/experiments")  # missing, so created once
    assert created.body["display_name"] == "kd-nightly"
    (exp_id,) = kfp_api.experiments
    (req,) = kfp_api.calls("POST", "/runs")
    run = req.body
    assert run["display_name"] == "nightly-1"
    assert run["experiment_id"] == exp_id
    assert run["pipeline_spec"] == expected_spec(cfg, tmp_path)
    spec = ir(run["pipeline_spec"])
    assert spec["pipelineInfo"]["name"] == "kdflow"
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(defaults["config_json"]["defaultValue"])["distill"]["train"]["epochs"] == 7
    assert run["runtime_config"]["parameters"] == {
        "config_json": cfg.to_json(),
        "candidates": ["cnn4-kd", "cnn8-ce"],
        "tracking_uri": "http://mlflow.kdflow:5000",
    }
    assert {r.headers.get("authorization") for r in kfp_api.requests} == {"Bearer s3cret"}
    (run_id,) = kfp_api.runs
    assert f"run id: {run_id}\n" in result.output
    assert f"url: {kfp_api.url}/#/runs/details/{run_id}\n" in result.output
    assert "auth: --token" in result.output
    assert not kfp_api.calls("GET", f"/runs/{run_id}")  # no --wait, no polling


def test_existing_experiment_is_reused_in_the_namespace_with_the_env_token(kfp_api, monkeypatch):
    exp_id = kfp_api.add_experiment("kdflow-digits", namespace="team-a")
    kfp_api.add_experiment("kdflow-digits", namespace="team-b")
    kfp_api.token = "from-env"
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "from-env")
    result = kdflow_submit("--host", kfp_api.url + "/", "--namespace", "team-a")
    assert result.exit_code == 0, result.output

    assert not kfp_api.calls("POST", "/experiments")
    (lookup,) = kfp_api.calls("GET", "/experiments")
    assert lookup.query["namespace"] == "team-a"
    (req,) = kfp_api.calls("POST", "/runs")
    assert req.body["experiment_id"] == exp_id
    assert re.fullmatch(r"kdflow-digits-\d{8}-\d{6}", req.body["display_name"])
    assert req.body["runtime_config"]["parameters"] == pipeline_arguments(load_config())
    assert f"experiment kdflow-digits (existing, id {exp_id})" in result.output
    assert "auth: $KF_PIPELINES_TOKEN" in result.output


def test_a_compiled_package_is_submitted_as_is(kfp_api, tmp_path):
    package = tmp_path / "pkg.yaml"
    compiled = CliRunner().invoke(app, ["compile", "-o", str(package), "--set", "experiment=from-package"])
    assert compiled.exit_code == 0, compiled.output
    result = kdflow_submit("--host", kfp_api.url, "--package", str(package), "--param", "candidates=[cnn8-kd]")
    assert result.exit_code == 0, result.output

    (created,) = kfp_api.calls("POST", "/experiments")
    assert created.body["display_name"] == "from-package"  # the experiment of the config inside the package
    (req,) = kfp_api.calls("POST", "/runs")
    docs = list(yaml.safe_load_all(package.read_text()))
    assert ir(req.body["pipeline_spec"]) == docs[0]
    params = req.body["runtime_config"]["parameters"]
    assert params["candidates"] == ["cnn8-kd"]
    assert json.loads(params["config_json"])["experiment"] == "from-package"
    assert {r.headers.get("authorization") for r in kfp_api.requests} == {None}  # no token anywhere


def _data_prep_caching(pipeline_spec: dict) -> dict:
    return all_tasks(ir(pipeline_spec))["data-prep"]["cachingOptions"]


@pytest.mark.parametrize("schedule", [None, "@daily"])
def test_s3_data_is_never_served_from_the_cache_whatever_the_package_was_compiled_with(kfp_api, tmp_path, schedule):
    """A package compiled from an offline config caches data prep; sent with a config that reads s3://, the run
    (and every scheduled run, which all send the same config: KFP's cache key) must fetch the objects again."""
    package = tmp_path / "pkg.yaml"
    assert CliRunner().invoke(app, ["compile", "-o", str(package)]).exit_code == 0
    assert _data_prep_caching(next(yaml.safe_load_all(package.read_text()))) == {"enableCache": True}
    s3_cfg = load_config(None, {"data.source": "s3://kdflow-data/digits/", "data.image_size": 8})
    args = ["--host", kfp_api.url, "--package", str(package), "--param", f"config_json={s3_cfg.to_json()}"]
    result = kdflow_submit(*args, *(["--schedule", schedule] if schedule else []))
    assert result.exit_code == 0, result.output
    (req,) = kfp_api.calls("POST", "/recurringruns" if schedule else "/runs")
    assert _data_prep_caching(req.body["pipeline_spec"]) == {}  # {} = caching off in the IR

    offline = kdflow_submit("--host", kfp_api.url, "--package", str(package))  # the package's own config: as is
    assert offline.exit_code == 0, offline.output
    req = kfp_api.calls("POST", "/runs")[-1]
    assert _data_prep_caching(req.body["pipeline_spec"]) == {"enableCache": True}


@pytest.mark.parametrize(
    "states, code, last_line, polls",
    [
        (("RUNNING", "RUNNING", "SUCCEEDED"), 0, "run SUCCEEDED", 3),
        (("RUNNING", "FAILED"), 1, "run FAILED: task distill failed: CUDA out of memory", 2),
        (("PENDING", "CANCELED"), 1, "run CANCELED", 2),
    ],
)
def test_wait_follows_the_run_to_its_final_state(kfp_api, states, code, last_line, polls):
    kfp_api.run_states = states
    result = kdflow_submit("--host", kfp_api.url, "--wait", "--poll-interval", "0.02")
    assert result.exit_code == code, result.output
    (run_id,) = kfp_api.runs
    assert len(kfp_api.calls("GET", f"/runs/{run_id}")) == polls
    assert [line.strip() for line in result.output.splitlines() if "state:" in line] == [
        f"state: {s}" for s in dict.fromkeys(states)
    ]
    assert result.output.splitlines()[-1] == last_line


@pytest.mark.parametrize("status", [503, 429])
def test_wait_rides_out_transient_api_errors_and_times_out(kfp_api, status):
    kfp_api.flaky_polls, kfp_api.flaky_status = 2, status
    kfp_api.run_states = ("RUNNING",)
    result = kdflow_submit("--host", kfp_api.url, "--wait", "--poll-interval", "0.02", "--timeout", "0.3")
    assert result.exit_code == 1, result.output
    (run_id,) = kfp_api.runs
    assert "state: RUNNING" in result.output  # the two errors did not end the wait
    assert f"error: run {run_id} still RUNNING after 0.3 s (it goes on in the cluster)" in result.output


def test_wait_gives_up_after_five_consecutive_api_errors(kfp_api):
    kfp_api.flaky_polls = 5
    kfp_api.run_states = ("RUNNING",)
    result = kdflow_submit("--host", kfp_api.url, "--wait", "--poll-interval", "0.02", "--timeout", "60")
    assert result.exit_code == 1, result.output
    (run_id,) = kfp_api.runs
    assert len(kfp_api.calls("GET", f"/runs/{run_id}")) == 5  # no sixth try, and no waiting out the timeout
    assert f"getting run {run_id} failed: HTTP 503" in result.output


def test_schedule_creates_a_recurring_run_on_kfp_cron(kfp_api, tmp_path):
    result = kdflow_submit(
        *("--host", kfp_api.url, "--run-name", "weekly", "--schedule", "0 3 * * 0"),
        *("--param", "tracking_uri=http://mlflow:5000"),
    )
    assert result.exit_code == 0, result.output
    assert not kfp_api.calls("POST", "/runs")
    (req,) = kfp_api.calls("POST", "/recurringruns")
    job = req.body
    assert job["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}}  # seconds field added for KFP
    assert job["display_name"] == "weekly"
    assert (job["mode"], job["max_concurrency"], job["no_catchup"]) == ("ENABLE", 1, True)
    assert job["experiment_id"] == next(iter(kfp_api.experiments))
    assert job["pipeline_spec"] == expected_spec(load_config(), tmp_path)
    assert job["runtime_config"]["parameters"] == pipeline_arguments(load_config(), "http://mlflow:5000")
    (rid,) = kfp_api.recurring_runs
    assert f"recurring run id: {rid}\nurl: {kfp_api.url}/#/recurringrun/details/{rid}\n" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--param", "epochs=3"], "unknown pipeline parameter epochs; the pipeline's parameters are "),
        (["--param", "candidates=[nope-kd]"], "candidates nope-kd are not in the config; its candidates are "),
        (["--param", "candidates=pruned60-kd"], "--param candidates='pruned60-kd': the pipeline declares"),
        (["--param", 'config_json={"seed": -1}'], "run parameter config_json is not a valid kdflow config"),
        (["--param", "tracking_uri"], "--param expects key=value, got 'tracking_uri'"),
        (
            ["--param", "tracking_uri=http://bob:hunter2@mlflow:5000"],
            "run parameter tracking_uri='http://***@mlflow:5000' carries credentials",
        ),
        (["--schedule", "0 3 * *"], "--schedule '0 3 * *': expected a cron expression with 6 fields"),
        (["--schedule", "@fortnightly"], "--schedule '@fortnightly': unknown descriptor"),
        (["--schedule", "@daily", "--wait"], "--wait follows one run, --schedule creates a recurring run"),
        (["--package", "nowhere.yaml"], "pipeline package not found: nowhere.yaml"),
        (["--package", "p.yaml", "--set", "seed=1"], "pass either --package or --config/--set"),
        (["--set", "seed=-1"], "seed: Input should be greater than or equal to 0"),
        (["--wait", "--poll-interval", "0"], "Invalid value for '--poll-interval'"),
    ],
)
def test_bad_input_fails_before_any_request(kfp_api, args, message):
    result = kdflow_submit("--host", kfp_api.url, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert kfp_api.requests == [] and "hunter2" not in result.output


def test_unknown_parameter_error_names_the_valid_ones(kfp_api):
    result = kdflow_submit("--host", kfp_api.url, "--param", "epochs=3", "--param", "seeds=1")
    assert "unknown pipeline parameter epochs, seeds; the pipeline's parameters are " in result.output
    assert "candidates, config_json, tracking_uri" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--host", "kfp.example.com"],
            "--host must be a URL starting with http:// or https://, got 'kfp.example.com'",
        ),
        (["--host", "ftp://kfp"], "--host must be a URL starting with http:// or https://, got 'ftp://kfp'"),
        ([], "no KFP API given: pass --host URL or set $KF_PIPELINES_ENDPOINT"),
    ],
)
def test_host_must_be_an_http_url(kfp_api, args, message):
    result = kdflow_submit(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_unreachable_host_and_refused_token_are_clear_errors(kfp_api):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = kdflow_submit("--host", closed)
    assert result.exit_code == 1, result.output
    assert f"error: cannot reach the KFP API at {closed}: " in result.output

    kfp_api.token = "right"
    result = kdflow_submit("--host", kfp_api.url, "--token", "wrong")
    assert result.exit_code == 1, result.output
    assert f"the KFP API at {kfp_api.url} refused the credentials (HTTP 401; auth: --token)" in result.output
    assert not kfp_api.calls("POST", "/runs")


def test_multi_user_needs_a_namespace(kfp_api):
    kfp_api.multi_user = True
    result = kdflow_submit("--host", kfp_api.url)
    assert result.exit_code == 2, result.output
    assert "this Kubeflow Pipelines is multi-user: pass --namespace" in result.output
    assert not kfp_api.calls("POST", "/experiments")


def test_token_sources_in_order(kfp_api, tmp_path, monkeypatch):
    token_file = tmp_path / "sa-token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    assert submit.resolve_auth(None) == submit.Auth(
        token_file=str(token_file), source=f"service-account token {token_file}"
    )
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "from-env")
    assert submit.resolve_auth(None) == submit.Auth(token="from-env", source="$KF_PIPELINES_TOKEN")
    assert submit.resolve_auth("from-flag") == submit.Auth(token="from-flag", source="--token")
    monkeypatch.delenv("KF_PIPELINES_TOKEN")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(submit.SubmitError, match="KF_PIPELINES_SA_TOKEN_PATH points to .*missing"):
        submit.resolve_auth(None)
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH")
    assert submit.resolve_auth(None) == submit.Auth()


def test_service_account_token_is_reread_when_it_rotates(kfp_api, tmp_path, monkeypatch):
    token_file = tmp_path / "sa-token"
    token_file.write_text("tok-1")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    kfp_api.token = "tok-1"
    client, _ = submit.open_client(kfp_api.url, submit.resolve_auth(None))
    assert submit.ensure_experiment(client, kfp_api.url, "kd", None) == ("exp-1", True)
    n = len(kfp_api.requests)
    token_file.write_text("tok-2")  # the kubelet refreshes the projected token
    kfp_api.token = "tok-2"
    assert submit.ensure_experiment(client, kfp_api.url, "kd", None) == ("exp-1", False)
    assert {r.headers["authorization"] for r in kfp_api.requests[:n]} == {"Bearer tok-1"}
    assert {r.headers["authorization"] for r in kfp_api.requests[n:]} == {"Bearer tok-2"}
    kfp_api.token = "revoked"
    with pytest.raises(
        submit.KfpError, match=r"looking up experiment 'kd' failed: .*refused the credentials \(HTTP 401\)"
    ):
        submit.ensure_experiment(client, kfp_api.url, "kd", None)


@pytest.mark.parametrize(
    "given, sent",
    [
        ("0 0 3 * * 0", "0 0 3 * * 0"),
        ("  0 3   * * 0 ", "0 0 3 * * 0"),
        ("*/30 * * * *", "0 */30 * * * *"),
        ("0 0 9 ? * 2-6", "0 0 9 ? * 2-6"),
        ("@weekly", "@weekly"),
        ("@every 12h30m", "@every 12h30m"),
    ],
)
def test_kfp_cron(given, sent):
    assert submit.kfp_cron(given) == sent


@pytest.mark.parametrize("bad", ["", "* * * *", "0 0 0 0 0 0 0", "0 3 * * 0;", "@every soon"])
def test_kfp_cron_rejects(bad):
    with pytest.raises(submit.SubmitError, match="--schedule"):
        submit.kfp_cron(bad)
