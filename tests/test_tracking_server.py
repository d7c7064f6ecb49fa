"""The pipeline's steps against the production-shaped tracking stack, all real servers on loopback.

An MLflow server (`--workers 1`) keeps runs and the registry in PostgreSQL and proxies artifacts to an
S3-compatible (moto) server. The steps get nothing but the tracking URI: no S3 endpoint, no credentials, so every
artifact travels through the server's mlflow-artifacts proxy, as from a pipeline pod. The test then looks behind
the server: boto3 at the bucket, plain HTTP at the REST API, psycopg2 at the database.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest

from kdflow import objectives
from kdflow.config import load_config
from kdflow.steps.context import StepContext
from kdflow.steps.data_prep import prepare_data, record_data
from kdflow.steps.distill import distill
from kdflow.steps.evaluate import evaluate_candidates
from kdflow.steps.finalize import finalize
from kdflow.steps.prune import prune_teacher
from kdflow.steps.register import register
from kdflow.steps.teacher import train_teacher
from tests.helpers.config import tiny_overrides
from tests.helpers.servers import mlflow_server, postgres_server, s3_server

pytestmark = pytest.mark.slow

ARTIFACT_PREFIX = "mlartifacts"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """PostgreSQL, moto S3 and an MLflow server using both; stopped in reverse order even when the test fails.
    Their logs are printed after they stop; pytest shows that output when the test fails."""
    pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) provides the S3 test server")
    pytest.importorskip("psycopg2", reason="psycopg2-binary (a dev dependency) is MLflow's PostgreSQL driver")
    logs = tmp_path_factory.mktemp("server-logs")
    try:
        with contextlib.ExitStack() as servers:
            pg = servers.enter_context(postgres_server(logs))
            s3 = servers.enter_context(s3_server(logs))
            server = servers.enter_context(mlflow_server(logs, pg.url, s3, ARTIFACT_PREFIX))
            yield pg, s3, server, logs
    finally:
        for log in sorted(logs.glob("*.log")):
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
            print(f"--- last lines of {log} ---\n{tail}")


@pytest.fixture
def client_env(monkeypatch):
    """This process as a pipeline step sees it: no S3 endpoint or credentials, and MLflow's process-wide URIs
    (which the steps set) put back afterwards."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    for key in [k for k in os.environ if k.startswith("AWS_")] + ["MLFLOW_S3_ENDPOINT_URL"]:
        monkeypatch.delenv(key, raising=False)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(key, "")  # recorded, so whatever the steps export here is undone afterwards
        monkeypatch.delenv(key)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)


def s3_key(artifact_uri: str) -> str:
    """Where the server's proxy keeps an mlflow-artifacts:/ URI in the bucket."""
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
    return f"{ARTIFACT_PREFIX}/{artifact_uri[len('mlflow-artifacts:/') :].strip('/')}"


def test_pipeline_steps_log_to_server_with_postgres_backend_and_s3_artifacts(stack, client_env, tmp_path):
    pg, s3, server, logs = stack
    cfg = load_config(None, tiny_overrides())
    config_json = cfg.to_json()
    pipeline_run_id = f"server-test-{uuid.uuid4().hex[:8]}"
    names = [c.name for c in cfg.candidates()]
    groups = objectives.candidate_groups(cfg)  # the steps' work: here one step trains both candidates
    assert groups == [",".join(names)]

    def ctx() -> StepContext:
        """Every step opens its own context, as each pod does."""
        return StepContext.open(
            config_json=config_json,
            tracking_uri=server.url,
            pipeline_run_id=pipeline_run_id,
            pipeline_run_name="server-test",
        )

    data, teacher, pruned = (str(tmp_path / d) for d in ("data", "teacher", "pruned"))
    prepare_data(cfg, data)  # store-free
    first = ctx()
    record_data(first, data)
    train_teacher(first, data, teacher)
    prune_teacher(ctx(), data, teacher, pruned)
    students = [str(tmp_path / "students" / str(i)) for i in range(len(groups))]
    reports = [str(tmp_path / "reports" / f"{i}.json") for i in range(len(groups))]
    for group, student, report in zip(groups, students, reports):
        distill(ctx(), group.split(","), data, teacher, pruned, student)
        evaluate_candidates(ctx(), data, teacher, student, report)
    summary = register(ctx(), data, teacher, students, reports, str(tmp_path / "decision.json"))
    assert finalize(ctx(), succeeded=True) == []  # the exit handler: nothing was left RUNNING
    decision = summary["decision"]
    assert decision["promoted"] and decision["champion_version"] is not None, decision

    # --- REST API: experiment with proxied artifacts, parent + one finished child per step and candidate
    exp = server.api("experiments/get-by-name", experiment_name=cfg.experiment)["experiment"]
    assert exp["artifact_location"] == f"mlflow-artifacts:/{exp['experiment_id']}"
    runs = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in tags[r["info"]["run_id"]]]
    assert len(parents) == 1
    parent = parents[0]["info"]
    assert parent["status"] == "FINISHED" and parent["run_name"] == "server-test"
    assert tags[parent["run_id"]]["kdflow.pipeline_run_id"] == pipeline_run_id
    children = {r["info"]["run_name"]: r["info"] for r in runs if r["info"]["run_id"] != parent["run_id"]}
    assert set(children) == {"data-prep", "teacher", "prune", *names, "register"}
    assert all(tags[c["run_id"]]["mlflow.parentRunId"] == parent["run_id"] for c in children.values())
    assert {n: c["status"] for n, c in children.items()} == dict.fromkeys(children, "FINISHED")

    # --- REST API: registry: one version per candidate, one teacher version, the alias where register put it
    reg = cfg.registry
    assert server.api("registered-models/get", name=reg.model_name)["registered_model"]["name"] == reg.model_name
    versions = server.api("model-versions/search", filter=f"name='{reg.model_name}'")["model_versions"]
    assert sorted(int(v["version"]) for v in versions) == list(range(1, len(names) + 1))
    assert {int(v["version"]) for v in versions} == set(decision["versions"].values())
    assert {v["run_id"] for v in versions} == {children[n]["run_id"] for n in names}
    teacher_versions = server.api("model-versions/search", filter=f"name='{reg.teacher_model_name}'")
    assert [v["version"] for v in teacher_versions["model_versions"]] == ["1"]
    champion = server.api("registered-models/alias", name=reg.model_name, alias=reg.alias)["model_version"]
    assert int(champion["version"]) == decision["champion_version"]
    assert champion["run_id"] == children[decision["selected"]]["run_id"]

    # --- S3 behind the proxy: every registered model's files, every candidate's figure, nothing on local disk
    keys = set(s3.keys(f"{ARTIFACT_PREFIX}/"))
    for v in [*versions, *teacher_versions["model_versions"]]:
        assert v["source"].startswith("models:/m-"), v  # MLflow 3: a version points at a logged model
        model = server.api(f"logged-models/{v['source'][len('models:/') :]}")["model"]["info"]
        assert model["source_run_id"] == v["run_id"]
        root = s3_key(model["artifact_uri"])
        assert {f"{root}/MLmodel", f"{root}/data/model.pt2"} <= keys, sorted(k for k in keys if k.startswith(root))
    for name in names:
        root = s3_key(children[name]["artifact_uri"])
        assert f"{root}/confusion_matrix.png" in keys
    assert f"{s3_key(children['data-prep']['artifact_uri'])}/manifest.json" in keys
    assert f"{s3_key(children['register']['artifact_uri'])}/decision.json" in keys
    assert not (logs / ARTIFACT_PREFIX).exists()  # the server's working directory: no local fallback

    # --- the champion downloads through the proxy (still no S3 credentials here) and serves raw pixels
    import mlflow.pytorch
    import torch

    served = mlflow.pytorch.load_model(f"models:/{reg.model_name}@{reg.alias}")
    assert served(torch.rand(3, 1, 8, 8) * 255).shape == (3, 10)

    # --- PostgreSQL really is the backend: the runs, versions and alias are rows in its tables
    with contextlib.closing(pg.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp["experiment_id"]),))
        assert cur.fetchone()[0] == len(runs) == len(names) + 5
        cur.execute("SELECT count(*) FROM model_versions WHERE name = %s", (reg.model_name,))
        assert cur.fetchone()[0] == len(names)
        cur.execute(
            "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s", (reg.model_name, reg.alias)
        )
        assert cur.fetchone() == (decision["champion_version"],)
