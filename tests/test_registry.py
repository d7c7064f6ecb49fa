"""The selection policy (pure) and the champion gate on a real MLflow SQLite registry."""

from __future__ import annotations

import itertools

import pytest

from kdflow.config import PolicyConfig, RegistryConfig
from kdflow.registry import (
    TEST_HASH_TAG,
    Candidate,
    beats,
    check_metrics,
    current_champion,
    register_and_promote,
    select,
)

TEACHER = {"params": 1000.0, "val_top1": 0.8, "val_loss": 0.5}


def cand(name: str, val_top1: float = 0.5, params: float = 100, latency: float = 1.0, **extra: float) -> Candidate:
    metrics = {"val_top1": val_top1, "params": float(params), "latency_ms_b1": latency, **extra}
    return Candidate(name, metrics)


def only(**constraints) -> PolicyConfig:
    """A policy with exactly the given constraints (the default min_compression=4 is switched off)."""
    return PolicyConfig(**{"min_compression": None, **constraints})


# ------------------------------------------------------------------------------------------ pure policy


def test_default_policy_has_only_the_compression_constraint():
    p = PolicyConfig()
    assert (p.metric, p.min_compression, p.max_params, p.max_latency_ms, p.min_teacher_retention) == (
        "val_top1",
        4.0,
        None,
        None,
        None,
    )


def test_no_constraints_accepts_everyone():
    cs = [cand("a", params=10**9, latency=1e6, val_top1=0.0), cand("b")]
    sel = select(cs, only(), TEACHER)
    assert sel.rejected == {}
    assert sel.best.name == "b"


def test_min_compression_boundary_and_reason():
    # teacher has 1000 params: 250 → exactly 4x (kept), 251 → 3.98x (rejected)
    cs = [cand("at", params=250), cand("over", params=251), cand("small", params=10)]
    sel = select(cs, only(min_compression=4.0), TEACHER)
    assert set(sel.rejected) == {"over"}
    assert sel.rejected["over"] == "compression 3.98x < 4.0x"


def test_max_params_boundary_and_reason():
    cs = [cand("at", params=100), cand("over", params=101)]
    sel = select(cs, only(max_params=100), TEACHER)
    assert sel.rejected == {"over": "params 101 > 100"}
    assert sel.best.name == "at"


def test_max_latency_uses_batch1_latency_metric():
    cs = [cand("at", latency=2.0), cand("over", latency=2.5)]
    sel = select(cs, only(max_latency_ms=2.0), TEACHER)
    assert sel.rejected == {"over": "latency 2.500 ms > 2.0 ms"}
    assert sel.best.name == "at"


def test_min_teacher_retention_boundary_and_reason():
    # teacher val_top1 0.8: 0.4 is exactly 50 % (kept), 0.39 is 48.75 % (rejected)
    cs = [cand("at", val_top1=0.4), cand("under", val_top1=0.39)]
    sel = select(cs, only(min_teacher_retention=0.5), TEACHER)
    assert sel.rejected == {"under": "teacher retention 0.487 < 0.5"}
    assert sel.best.name == "at"


def test_min_speedup_reads_the_measured_speedup_and_says_so():
    # 2.0x exactly is kept, 1.99x and a candidate without a measured speed-up are not
    cs = [cand("at", speedup=2.0), cand("under", speedup=1.99), cand("unmeasured"), cand("fast", speedup=5.0)]
    sel = select(cs, only(min_speedup=2.0), TEACHER)
    assert sel.rejected == {
        "under": "measured speed-up 1.99x < 2.0x",
        "unmeasured": "measured speed-up 0.00x < 2.0x",
    }
    assert sel.best.name == "at"  # the policy ranks qualifiers by val_top1, then name: not by speed
    assert PolicyConfig().min_speedup is None  # off by default


def test_min_teacher_retention_with_a_teacher_that_gets_nothing_right():
    sel = select([cand("a", val_top1=0.0)], only(min_teacher_retention=0.9), {**TEACHER, "val_top1": 0.0})
    assert sel.rejected == {} and sel.best.name == "a"  # nothing to retain: no division by zero


def test_every_violation_is_listed():
    c = cand("bad", params=500, latency=9.0, val_top1=0.1)
    policy = PolicyConfig(min_compression=4.0, max_params=100, max_latency_ms=1.0, min_teacher_retention=0.5)
    sel = select([c], policy, TEACHER)
    assert sel.best is None
    assert sel.rejected["bad"] == (
        "compression 2.00x < 4.0x; params 500 > 100; latency 9.000 ms > 1.0 ms; teacher retention 0.125 < 0.5"
    )


def test_constraints_combine_and_best_is_picked_among_qualifiers():
    cs = [
        cand("too_big", val_top1=0.99, params=400),  # best accuracy, but only 2.5x compression
        cand("too_slow", val_top1=0.95, params=100, latency=5.0),
        cand("too_weak", val_top1=0.30, params=50),
        cand("ok_low", val_top1=0.70, params=200),
        cand("ok_high", val_top1=0.80, params=150),
    ]
    policy = PolicyConfig(min_compression=4.0, max_latency_ms=2.0, min_teacher_retention=0.5)
    sel = select(cs, policy, TEACHER)
    assert set(sel.rejected) == {"too_big", "too_slow", "too_weak"}
    assert "compression" in sel.rejected["too_big"]
    assert "latency" in sel.rejected["too_slow"]
    assert "teacher retention" in sel.rejected["too_weak"]
    assert sel.best.name == "ok_high"


def test_best_by_val_top1_is_independent_of_input_order():
    cs = [cand("a", val_top1=0.6), cand("b", val_top1=0.9), cand("c", val_top1=0.7)]
    for perm in itertools.permutations(cs):
        assert select(list(perm), only(), TEACHER).best.name == "b"


def test_val_top5_higher_is_better():
    cs = [cand("a", val_top5=0.95), cand("b", val_top5=0.99), cand("c", val_top5=0.90)]
    assert select(cs, only(metric="val_top5"), TEACHER).best.name == "b"


def test_val_loss_lowest_wins():
    cs = [
        cand("a", val_top1=0.9, val_loss=0.40),
        cand("b", val_top1=0.5, val_loss=0.10),
        cand("c", val_top1=0.7, val_loss=0.20),
    ]
    for perm in itertools.permutations(cs):
        assert select(list(perm), only(metric="val_loss"), TEACHER).best.name == "b"


def test_ties_broken_by_fewer_params_then_name():
    cs = [
        cand("zeta", val_top1=0.9, params=50),
        cand("big", val_top1=0.9, params=90),
        cand("alpha", val_top1=0.9, params=60),
        cand("worse", val_top1=0.8, params=1),
    ]
    for perm in itertools.permutations(cs):
        assert select(list(perm), only(), TEACHER).best.name == "zeta"
    same = [
        cand("m", val_top1=0.9, params=50),
        cand("b", val_top1=0.9, params=50),
        cand("x", val_top1=0.9, params=50),
    ]
    for perm in itertools.permutations(same):
        assert select(list(perm), only(), TEACHER).best.name == "b"


def test_accuracy_ties_broken_by_lower_val_loss_before_params():
    cs = [cand("a", val_top1=0.9, val_loss=0.3, params=10), cand("b", val_top1=0.9, val_loss=0.2, params=90)]
    for perm in itertools.permutations(cs):
        assert select(list(perm), only(), TEACHER).best.name == "b"


@pytest.mark.parametrize(
    "kw, classes, key",
    [
        ({"policy": PolicyConfig(metric="val_top5")}, 5, "registry.policy.metric: val_top5"),
        ({"champion_metric": "test_top5"}, 3, "registry.champion_metric: test_top5"),
    ],
)
def test_top5_settings_need_more_than_five_classes(kw, classes, key):
    cfg = RegistryConfig(**kw)
    with pytest.raises(ValueError, match=f"^{key} is not measured for a target task of {classes} classes"):
        check_metrics(cfg, classes)
    check_metrics(cfg, 6)  # measured from 6 classes on
    check_metrics(RegistryConfig(), 2)  # top-1 always is


def test_val_loss_ties_broken_by_fewer_params():
    cs = [
        cand("a", val_loss=0.2, params=80),
        cand("b", val_loss=0.2, params=40),
        cand("c", val_loss=0.3, params=1),
    ]
    assert select(cs, only(metric="val_loss"), TEACHER).best.name == "b"


def test_nothing_qualifies_gives_no_best():
    cs = [cand("a", params=500), cand("b", params=600)]
    sel = select(cs, PolicyConfig(min_compression=4.0), TEACHER)
    assert sel.best is None
    assert set(sel.rejected) == {"a", "b"}


def test_empty_candidate_list():
    sel = select([], PolicyConfig(), TEACHER)
    assert sel.best is None and sel.rejected == {}


@pytest.mark.parametrize(
    "new, current, min_improvement, expected",
    [
        (0.1, None, 0.0, True),  # no champion: anything wins
        (0.0, None, 0.5, True),  # ... even with a margin
        (0.5, 0.5, 0.0, False),  # equal is not better
        (0.5000001, 0.5, 0.0, True),
        (0.4, 0.5, 0.0, False),
        (0.6, 0.5, 0.25, False),  # better, but not by the margin
        (0.5, 0.25, 0.25, False),  # exactly the margin is not "more than"
        (0.76, 0.5, 0.25, True),
    ],
)
def test_beats(new, current, min_improvement, expected):
    assert beats(new, current, min_improvement) is expected


# ------------------------------------------------------------------------------ real MLflow registry


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite tracking + registry store for this module (creating its tables takes seconds); each test
    uses its own registered model name. MLflow's process-wide URIs and the MLFLOW_* variables that
    `mlflow.set_tracking_uri` exports are put back afterwards, so later tests see the environment they
    expect."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # recorded, so undone on exit
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.delenv("MLFLOW_REGISTRY_URI")  # the registry follows the tracking store
        mp.setattr(tracking_utils, "_tracking_uri", None)
        mp.setattr(registry_utils, "_registry_uri", None)
        mlflow.set_tracking_uri(uri)
        assert mlflow.get_registry_uri() == uri
        client = MlflowClient()
        exp_id = client.create_experiment("kdflow-registry-tests", artifact_location=(tmp / "artifacts").as_uri())
        yield client, exp_id


def logged(
    exp_id: str, name: str, val_top1: float, test_top1: float, params: int = 100, latency: float = 1.0
) -> Candidate:
    """A candidate backed by a real logged torch model, with the metric keys the policy and gate read."""
    import mlflow
    import torch
    from torch import nn

    from kdflow.tracking import log_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with mlflow.start_run(experiment_id=exp_id, run_name=name) as run:
        uri = log_model(model, torch.rand(4, 1, 8, 8) * 255)
    metrics = {
        "val_top1": val_top1,
        "test_top1": test_top1,
        "params": float(params),
        "latency_ms_b1": latency,
    }
    return Candidate(name, metrics, run_id=run.info.run_id, model_uri=uri, tags={"kdflow.candidate": name})


class Rescore:
    """Records the URIs it is asked to score; returns `value`, or fails the test when `value` is None."""

    def __init__(self, value: float | None = None):
        self.value, self.calls = value, []

    def __call__(self, uri: str) -> float:
        self.calls.append(uri)
        if self.value is None:
            raise AssertionError(f"rescore must not be called (asked for {uri})")
        return self.value


def registry_cfg(name: str, **kw) -> RegistryConfig:
    kw.setdefault("settle_seconds", 0.0)  # one store, one writer: a read after the write is enough
    return RegistryConfig(model_name=name, policy=PolicyConfig(min_compression=4.0), **kw)


def champion_version(client, name: str) -> int:
    return int(client.get_model_version_by_alias(name, "champion").version)


def test_champion_lifecycle_on_same_test_data(store):
    client, exp = store
    cfg = registry_cfg("lifecycle")
    assert current_champion(client, cfg) is None  # no registered model yet

    # run 1: three candidates, one fails the compression constraint despite the best val accuracy
    run1 = [
        logged(exp, "a-kd", 0.80, 0.78, params=200),
        logged(exp, "b-ce", 0.85, 0.83, params=150),
        logged(exp, "fat-kd", 0.99, 0.99, params=900),
    ]
    d1 = register_and_promote(client, cfg, run1, TEACHER, test_hash="h1", rescore=Rescore())
    assert d1.versions == {"a-kd": 1, "b-ce": 2, "fat-kd": 3}
    assert d1.selected == "b-ce" and d1.promoted
    assert d1.champion_version == 2 and d1.previous_champion is None and d1.previous_score is None
    assert "first champion" in d1.reason
    assert set(d1.rejected) == {"fat-kd"} and "compression" in d1.rejected["fat-kd"]
    assert champion_version(client, "lifecycle") == 2

    for c in run1:  # every version carries its metrics, the test-data hash and the candidate's own tags
        mv = client.get_model_version("lifecycle", str(d1.versions[c.name]))
        assert mv.tags[TEST_HASH_TAG] == "h1"
        assert mv.tags["kdflow.candidate"] == c.name
        for k, v in c.metrics.items():
            assert float(mv.tags[k]) == pytest.approx(v, rel=1e-5)
        assert mv.run_id == c.run_id
    champ = client.get_model_version_by_alias("lifecycle", "champion")
    assert float(champ.tags["test_top1"]) == pytest.approx(0.83)

    # run 2: the best candidate is worse on test data → registered, alias stays, no rescoring (same hash)
    run2 = [logged(exp, "c-kd", 0.90, 0.80), logged(exp, "d-ce", 0.70, 0.95)]
    no_rescore = Rescore()
    d2 = register_and_promote(client, cfg, run2, TEACHER, test_hash="h1", rescore=no_rescore)
    assert no_rescore.calls == []
    assert d2.versions == {"c-kd": 4, "d-ce": 5}
    assert d2.selected == "c-kd"  # chosen on validation: d-ce's better test score plays no part
    assert not d2.promoted
    assert d2.champion_version == 2 and d2.previous_champion == 2
    assert d2.previous_score == pytest.approx(0.83)
    assert "does not beat champion v2" in d2.reason
    assert champion_version(client, "lifecycle") == 2
    assert client.get_model_version("lifecycle", "4").tags[TEST_HASH_TAG] == "h1"

    # run 3: a better one takes the alias
    run3 = [logged(exp, "e-kd", 0.90, 0.88)]
    d3 = register_and_promote(client, cfg, run3, TEACHER, test_hash="h1", rescore=Rescore())
    assert d3.versions == {"e-kd": 6}
    assert d3.promoted and d3.selected == "e-kd"
    assert d3.champion_version == 6 and d3.previous_champion == 2
    assert "beats champion v2" in d3.reason
    assert champion_version(client, "lifecycle") == 6


def test_equal_score_does_not_take_the_alias(store):
    client, exp = store
    cfg = registry_cfg("equal")
    register_and_promote(client, cfg, [logged(exp, "a", 0.8, 0.75)], TEACHER, "h1", Rescore())
    d = register_and_promote(client, cfg, [logged(exp, "b", 0.9, 0.75)], TEACHER, "h1", Rescore())
    assert not d.promoted and champion_version(client, "equal") == 1


def test_min_improvement_is_required(store):
    client, exp = store
    cfg = registry_cfg("margin", min_improvement=0.05)
    register_and_promote(client, cfg, [logged(exp, "a", 0.8, 0.75)], TEACHER, "h1", Rescore())
    d = register_and_promote(client, cfg, [logged(exp, "b", 0.8, 0.79)], TEACHER, "h1", Rescore())
    assert not d.promoted and champion_version(client, "margin") == 1
    d = register_and_promote(client, cfg, [logged(exp, "c", 0.8, 0.875)], TEACHER, "h1", Rescore())
    assert d.promoted and champion_version(client, "margin") == 3


def test_identical_rerun_does_not_take_the_alias(store):
    """A deterministic rerun on the same test data scores exactly what the champion did; it must not win."""
    client, exp = store
    cfg = registry_cfg("rerun")
    score = 1 / 3  # e.g. 150 of 450 test images; stored as "0.333333", which the very same score then "beats"
    register_and_promote(client, cfg, [logged(exp, "a", 0.8, score)], TEACHER, "h1", Rescore())
    d = register_and_promote(client, cfg, [logged(exp, "a", 0.8, score)], TEACHER, "h1", Rescore())
    assert not d.promoted
    assert champion_version(client, "rerun") == 1


def test_different_test_data_rescores_the_champion(store):
    client, exp = store
    cfg = registry_cfg("rescored")
    register_and_promote(client, cfg, [logged(exp, "a", 0.8, 0.90)], TEACHER, "h1", Rescore())
    assert champion_version(client, "rescored") == 1

    # new test data: the stored 0.90 is not comparable; the champion scores 0.95 on it, so 0.60 loses ...
    high = Rescore(0.95)
    d = register_and_promote(client, cfg, [logged(exp, "b", 0.8, 0.60)], TEACHER, "h2", high)
    assert high.calls == ["models:/rescored/1"]
    assert d.previous_score == 0.95
    assert not d.promoted and champion_version(client, "rescored") == 1
    assert d.versions == {"b": 2}
    assert client.get_model_version("rescored", "2").tags[TEST_HASH_TAG] == "h2"

    # ... but when the champion scores 0.50 on the new data, the same 0.60 wins (stored 0.90 notwithstanding)
    low = Rescore(0.50)
    d = register_and_promote(client, cfg, [logged(exp, "c", 0.8, 0.60)], TEACHER, "h2", low)
    assert low.calls == ["models:/rescored/1"]
    assert d.previous_score == 0.50
    assert d.promoted and d.previous_champion == 1 and d.champion_version == 3
    assert champion_version(client, "rescored") == 3

    # the new champion was scored on h2, so a further h2 run compares with its stored score without rescoring
    d = register_and_promote(client, cfg, [logged(exp, "d", 0.8, 0.55)], TEACHER, "h2", Rescore())
    assert d.previous_score == pytest.approx(0.60)
    assert not d.promoted and champion_version(client, "rescored") == 3


def test_no_qualifying_candidate_registers_but_leaves_the_alias(store):
    client, exp = store
    cfg = registry_cfg("unqualified")

    # nothing qualifies and there is no champion yet: versions exist, no alias is created
    fat = [logged(exp, "fat1", 0.99, 0.99, params=500), logged(exp, "fat2", 0.98, 0.98, params=600)]
    d = register_and_promote(client, cfg, fat, TEACHER, "h1", Rescore())
    assert d.versions == {"fat1": 1, "fat2": 2}
    assert d.selected is None and not d.promoted and d.champion_version is None
    assert d.reason == "no candidate satisfies the policy"
    assert set(d.rejected) == {"fat1", "fat2"}
    assert current_champion(client, cfg) is None
    assert client.get_model_version("unqualified", "2").tags[TEST_HASH_TAG] == "h1"

    register_and_promote(client, cfg, [logged(exp, "ok", 0.7, 0.5)], TEACHER, "h1", Rescore())
    assert champion_version(client, "unqualified") == 3

    # nothing qualifies again, with a much better test score: the alias stays where it was
    fat = [logged(exp, "fat3", 0.99, 0.99, params=400)]
    d = register_and_promote(client, cfg, fat, TEACHER, "h1", Rescore())
    assert d.versions == {"fat3": 4}
    assert d.selected is None and not d.promoted
    assert d.champion_version == 3 and d.previous_champion == 3
    assert champion_version(client, "unqualified") == 3


def test_teacher_registered_first_and_named_in_every_candidate(store):
    client, exp = store
    cfg = registry_cfg("with-teacher", teacher_model_name="with-teacher-t")
    teacher = logged(exp, "teacher", 0.9, 0.9, params=1000)
    d = register_and_promote(
        client, cfg, [logged(exp, "a", 0.8, 0.8)], TEACHER, "h1", Rescore(), teacher_uri=teacher.model_uri
    )
    assert d.teacher_version == 1
    tv = client.get_model_version("with-teacher-t", "1")
    assert tv.tags[TEST_HASH_TAG] == "h1" and float(tv.tags["val_top1"]) == TEACHER["val_top1"]
    v = client.get_model_version("with-teacher", "1")
    assert v.tags["kdflow.teacher_model"] == "with-teacher-t" and v.tags["kdflow.teacher_version"] == "1"


def test_champion_that_cannot_be_rescored_leaves_the_registry_untouched(store):
    client, exp = store
    cfg = registry_cfg("untouched", teacher_model_name="untouched-t")
    register_and_promote(client, cfg, [logged(exp, "a", 0.8, 0.8)], TEACHER, "h1", Rescore())

    def incompatible(uri: str) -> float:
        raise ValueError(f"the current champion ({uri}) cannot be scored on this run's test data")

    with pytest.raises(ValueError, match="cannot be scored"):
        register_and_promote(
            client,
            cfg,
            [logged(exp, "b", 0.9, 0.9)],
            TEACHER,
            "other-data",
            incompatible,
            teacher_uri=logged(exp, "t", 0.9, 0.9).model_uri,
        )
    assert [int(v.version) for v in client.search_model_versions("name='untouched'")] == [1]
    assert client.search_model_versions("name='untouched-t'") == []
    assert champion_version(client, "untouched") == 1


def test_gate_metric_missing_fails_before_anything_is_registered(store):
    client, exp = store
    cfg = registry_cfg("no-top5", champion_metric="test_top5")  # the candidates only have test_top1
    with pytest.raises(ValueError, match=r"candidates \['a'\] have no 'val_top1' or 'test_top5' metric"):
        register_and_promote(client, cfg, [logged(exp, "a", 0.8, 0.8)], TEACHER, "h1", Rescore(), teacher_uri=None)
    assert client.search_model_versions("name='no-top5'") == []


class Paired:
    """A stand-in for the register step's paired test: per-candidate correctness against a fixed champion's."""

    def __init__(self, champion, **candidates):
        self.champion, self.candidates, self.calls = champion, candidates, []

    def __call__(self, name: str, uri: str):
        import numpy as np

        from kdflow.stats import paired_gain

        self.calls.append((name, uri))
        return paired_gain(np.array(self.candidates[name], bool), np.array(self.champion, bool))


def test_significance_gate_moves_the_alias_only_on_a_significant_paired_win(store):
    client, exp = store
    cfg = registry_cfg("significance", gate="significance", significance_level=0.05)
    first = register_and_promote(client, cfg, [logged(exp, "a", 0.8, 0.5)], TEACHER, "h1", Rescore(), paired=None)
    assert first.promoted and champion_version(client, "significance") == 1  # no champion yet: no test needed
    champ = [True] * 50 + [False] * 50  # the champion gets 50 of 100 right
    # +3 images (4 won, 1 lost): higher top-1, but McNemar p = 0.375: the alias stays
    close = champ[:]
    close[50:54] = [True] * 4
    close[0] = False
    paired = Paired(champ, b=close)
    d = register_and_promote(client, cfg, [logged(exp, "b", 0.9, 0.53)], TEACHER, "h1", Rescore(), paired=paired)
    assert paired.calls == [("b", "models:/significance/1")]
    assert not d.promoted and champion_version(client, "significance") == 1 and d.versions == {"b": 2}
    assert d.reason.startswith("b is not significantly better than champion v1: test top-1 +3.0 [")
    assert "McNemar p=0.375 (level 0.05)" in d.reason
    # +20 images, none lost: p = 2 * 0.5**20, the interval above 0: it moves
    clear = [True] * 70 + [False] * 30
    d = register_and_promote(
        client, cfg, [logged(exp, "c", 0.9, 0.7)], TEACHER, "h1", Rescore(), paired=Paired(champ, c=clear)
    )
    assert d.promoted and champion_version(client, "significance") == 3
    assert d.reason.startswith("c beats champion v1: test top-1 +20.0 [")
    # the improvement gate would have promoted "b" (0.53 > 0.50): only the stated gate decides
    with pytest.raises(ValueError, match="needs the candidates' per-image test results"):
        register_and_promote(client, cfg, [logged(exp, "d", 0.9, 0.9)], TEACHER, "h1", Rescore(), paired=None)
    assert sorted(int(v.version) for v in client.search_model_versions("name='significance'")) == [1, 2, 3]


def test_significance_gate_is_top1_only():
    from kdflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="registry.gate=significance compares per-image top-1"):
        load_config(None, {"registry.gate": "significance", "registry.champion_metric": "test_top5"})
