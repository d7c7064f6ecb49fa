"""One champion, the right one: several pipelines' register steps at once against a real `mlflow server` on
127.0.0.1 (through its REST API only), same model name. In every trial the alias ends on the best pick, the best
pick's decision says so, and every move of the alias is recorded on the registered model."""

from __future__ import annotations

import contextlib
import random
import threading

import pytest

from kdflow import registry
from kdflow.config import PolicyConfig, RegistryConfig
from tests.helpers.servers import mlflow_server, s3_server

pytestmark = pytest.mark.slow

PIPELINES = 4
TRIALS = 20
TEACHER = {"params": 100_000.0, "val_top1": 0.9, "latency_ms_b1": 1.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) provides the S3 test server")
    logs = tmp_path_factory.mktemp("logs")
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(s3_server(logs))
        yield stack.enter_context(mlflow_server(logs, f"sqlite:///{logs / 'mlflow.db'}", s3))


@pytest.fixture
def tracking_at(server, monkeypatch):
    """MLflow's process-wide URIs pointed at the server, put back afterwards."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(server.url)
    yield server.url
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _pick(i: int, score: float) -> registry.Candidate:
    """A pipeline's only candidate: it passes the policy; its test score decides the gate."""
    metrics = {"val_top1": 0.8, "val_loss": 0.5, "test_top1": score, "params": 1_000.0, "latency_ms_b1": 0.1}
    return registry.Candidate(f"pipe{i}-kd", metrics, run_id=f"run-{i}", model_uri=f"s3://kdflow/models/pipe{i}")


def _no_rescore(uri: str) -> float:
    raise AssertionError(f"every version was scored on the same test split; nothing to rescore ({uri})")


def test_concurrent_register_steps_leave_the_alias_on_the_best_pick(tracking_at):
    from mlflow import MlflowClient

    wrong, moves = [], 0
    for trial in range(TRIALS):
        cfg = RegistryConfig(
            model_name=f"concurrent-{trial}", settle_seconds=0.5, policy=PolicyConfig(min_compression=4.0)
        )
        scores = random.Random(trial).sample([0.31, 0.52, 0.74, 0.81, 0.66, 0.45], PIPELINES)
        if trial % 2:  # half the trials start from a champion that one pick beats and the others do not
            first = registry.register_and_promote(
                MlflowClient(tracking_at), cfg, [_pick(9, 0.7)], TEACHER, "same-test", _no_rescore
            )
            assert first.promoted
        barrier, decisions = threading.Barrier(PIPELINES), {}

        def pipeline(i: int, cfg=cfg, barrier=barrier, decisions=decisions, scores=scores) -> None:
            client = MlflowClient(tracking_at)  # each step its own client, as in its own pod
            barrier.wait()
            decisions[i] = registry.register_and_promote(
                client, cfg, [_pick(i, scores[i])], TEACHER, "same-test", _no_rescore
            )

        threads = [threading.Thread(target=pipeline, args=(i,)) for i in range(PIPELINES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(decisions) == PIPELINES
        client = MlflowClient(tracking_at)
        best = max(range(PIPELINES), key=lambda i: scores[i])
        start = 0.7 if trial % 2 else None
        expected = decisions[best].versions[f"pipe{best}-kd"] if start is None or scores[best] > start else 1
        holder = int(client.get_model_version_by_alias(cfg.model_name, cfg.alias).version)
        if holder != expected:
            wrong.append((trial, holder, expected))
            continue
        history = registry.alias_history(client, cfg)  # (moves at once are recorded in either order)
        held = {m["version"] for m in history}
        assert holder in held and {m["alias"] for m in history} == {"champion"}
        assert all(m["previous_version"] != m["version"] for m in history)
        # each decision reports the holder when its step stopped watching: one the alias really had, and the
        # best pick's step (which watches until no one else writes) reports the end
        assert all(d.champion_version in held for d in decisions.values())
        if start is None or scores[best] > start:
            assert decisions[best].promoted and decisions[best].champion_version == holder
        moves += len(history)
    assert wrong == []  # 0 wrong champions in TRIALS trials
    assert moves >= TRIALS  # the alias moved in every trial (and its history says so)
