"""Adaptive distillation (`kdflow.search`, `distill.search`): the sampled space, successive halving and the
engine's `halt` hook, with exact expectations."""

from __future__ import annotations

import math

import pytest

from kdflow import search
from kdflow.config import LossConfig, SearchConfig, load_config
from kdflow.engine.loop import Student, fit_many
from kdflow.errors import ConfigError
from kdflow.objectives import candidate_groups
from tests.helpers.config import tiny_overrides
from tests.helpers.quadrants import CPU, NORM, TRAIN, VAL, cfg, cnn


def test_the_space_always_starts_with_plain_ce_and_draws_distinct_settings_in_range():
    space = SearchConfig(variants=12)
    _, variants = search.sample(space, seed=0, has_source=True)
    assert len(variants) == 12
    assert variants[0].settings() == {"kind": "ce"} and variants[0].loss.name == "auto00"
    assert [v.loss.name for v in variants] == [f"auto{i:02d}" for i in range(12)]
    keys = [tuple(sorted(v.settings().items())) for v in variants]
    assert len(set(keys)) == 12
    for v in variants[1:]:
        loss = v.loss
        assert loss.kind in space.kinds
        if loss.kind in ("kd", "dkd", "dist"):
            assert 1.0 <= loss.temperature <= 8.0
        if loss.kind in ("kd", "dkd"):
            assert 0.1 <= loss.alpha <= 1.0
        if loss.kind == "logit_mse":
            assert 0.01 <= loss.lam <= 10.0
        if loss.kind == "dkd":
            assert loss.transfer == "target"  # DKD needs the labels of its transfer images
        else:
            assert loss.transfer in ("target", "both")


def test_sampling_is_seeded_and_without_source_images_only_targets_are_drawn():
    space = SearchConfig(variants=6)
    first = [v.settings() for v in search.sample(space, 3, True)[1]]
    again = [v.settings() for v in search.sample(space, 3, True)[1]]
    other = [v.settings() for v in search.sample(space, 4, True)[1]]
    assert first == again and first != other
    assert {v.loss.transfer for v in search.sample(space, 3, False)[1]} == {"target"}


def test_a_space_too_small_for_distinct_variants_is_refused():
    space = SearchConfig(variants=2, kinds=["logit_mse"], lam=(1.0, 1.0), transfer=["target"])
    assert space.distinct_points() == 2
    assert [v.settings() for v in search.sample(space, 0, True)[1]] == [
        {"kind": "ce"},
        {"kind": "logit_mse", "lam": 1.0, "transfer": "target"},
    ]
    assert (
        SearchConfig(variants=3, kinds=["dist"], temperature=(1, 1), beta=(1, 1), gamma=(1, 2)).distinct_points()
        is None
    )
    assert SearchConfig(variants=7, kinds=["kd", "dkd"], temperature=(4, 4), alpha=(1, 1), beta=(8, 8),
                        transfer=["target", "both"]).distinct_points() == 1 + 2 * 2 + 1 * 2  # fmt: skip
    assert SearchConfig().distinct_points() is None
    with pytest.raises(ValueError, match="holds only 2 distinct settings"):
        SearchConfig(variants=3, kinds=["logit_mse"], lam=(1.0, 1.0), transfer=["target"])
    with pytest.raises(ValueError, match="drew only 2 distinct settings of variants=3"):  # no source: 2 of 3
        search.sample(SearchConfig(variants=3, kinds=["logit_mse"], lam=(1, 1), transfer=["target", "both"]), 0, False)


def test_rungs_and_survivors():
    assert search.rungs(SearchConfig(rung_epochs=3, reduction=2), 30) == [3, 6, 12, 24]
    assert search.rungs(SearchConfig(rung_epochs=2, reduction=3), 18) == [2, 6]
    assert search.rungs(SearchConfig(rung_epochs=5), 5) == []
    assert [search.survivors(list(range(n)), 2) for n in (1, 2, 3, 5, 8)] == [1, 1, 2, 3, 4]


def _variants(n: int) -> list[search.Variant]:
    return [search.Variant(LossConfig(name=f"v{i}", kind="ce"), trial=None) for i in range(n)]


def test_halving_keeps_the_best_half_at_rungs_only_and_breaks_ties_by_loss_then_order():
    vs = _variants(5)
    halving = search.Halving(SearchConfig(rung_epochs=2), 10, vs)
    standing = {0: (0.8, -0.5), 1: (0.9, -0.4), 2: (0.8, -0.3), 3: (0.7, -0.1), 4: (0.9, -0.4)}
    assert halving(1, standing) == set()  # not a rung
    assert halving(2, standing) == {0, 3}  # keeps ceil(5/2) = 3: 1 and 4 (0.9), then 2 (0.8 at lower loss)
    assert [v.halted_at for v in vs] == [2, None, None, 2, None]
    assert halving(4, {1: (0.9, -0.4), 2: (0.95, -0.3), 4: (0.9, -0.4)}) == {4}  # keeps 2, then 1 (tie: earlier)
    assert vs[2].best_val_acc == 0.95


def test_the_engine_stops_halted_students_where_the_hook_says():
    """Students 1 and 3 halted after epoch 2: their histories are the first two epochs of training alone (the
    same batches and RNG), the others train all 5 epochs; `halted` marks only the two."""
    losses = [LossConfig(name=f"ce{i}", kind="ce") for i in range(4)]
    calls = []

    def halt(epoch, standing):
        calls.append((epoch, sorted(standing)))
        return {1, 3} if epoch == 2 else set()

    students = [Student(cnn(4, seed=i), loss) for i, loss in enumerate(losses)]
    results = fit_many(students, TRAIN, VAL, cfg(5), NORM, seed=0, device=CPU, halt=halt)
    assert calls == [(1, [0, 1, 2, 3]), (2, [0, 1, 2, 3]), (3, [0, 2]), (4, [0, 2]), (5, [0, 2])]
    assert [r.halted for r in results] == [False, True, False, True]
    assert [r.epochs for r in results] == [5, 2, 5, 2]
    alone = fit_many([Student(cnn(4, seed=1), losses[1])], TRAIN, VAL, cfg(5), NORM, seed=0, device=CPU)[0]
    assert results[1].history == alone.history[:2]
    assert results[1].best_epoch in (1, 2)
    assert results[1].best_val_loss == alone.history[results[1].best_epoch - 1]["val_loss"]


def test_finish_tells_the_study_and_chooses_the_best_finalist():
    space = SearchConfig(variants=4)
    study, vs = search.sample(space, 0, True)
    for v, curve in zip(vs, ([0.5, 0.7, 0.8], [0.6, 0.6], [0.5, 0.9, 0.8], [0.4, 0.3])):
        v.curve = curve
        v.best_val_acc, v.best_key = max(curve), (max(curve), -0.1)
    vs[1].halted_at = vs[3].halted_at = 2
    chosen = search.finish(study, vs)
    assert chosen is vs[2]
    states = [t.state.name for t in study.trials if t.state.name != "FAIL"]
    assert states == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert [t.value for t in done] == [0.8, 0.9]
    assert done[1].intermediate_values == {1: 0.5, 2: 0.9, 3: 0.8}
    rows = search.record(vs, chosen)
    assert [r["chosen"] for r in rows] == [False, False, True, False]
    assert [r["halted_at"] for r in rows] == [None, 2, None, 2] and rows[0]["kind"] == "ce"


def test_a_search_adds_one_candidate_per_student_each_in_a_step_of_its_own():
    cfg = load_config(None, tiny_overrides(**{"distill.search": {"variants": 4}}))
    names = [c.name for c in cfg.candidates()]
    assert names == ["pruned60-kd", "pruned60-ce", "pruned60-auto"]
    assert candidate_groups(cfg) == ["pruned60-kd,pruned60-ce", "pruned60-auto"]
    assert cfg.candidate("pruned60-auto").search.variants == 4


@pytest.mark.parametrize(
    ("search_cfg", "message"),
    [
        ({"name": "kd"}, "distill.search.name 'kd' is also the name of a loss"),
        ({"name": "ce_baseline"}, "distill.search.name 'ce_baseline' is also the name of a loss or a ce baseline"),
        ({"kinds": ["ce", "kd"]}, "search kinds must be logit objectives"),
        ({"kinds": []}, "search kinds must be logit objectives"),
        ({"temperature": [4.0, 2.0]}, "0 < low <= high"),
        ({"alpha": [0.5, 1.5]}, "alpha range must lie in"),
        ({"variants": 1}, "distill.search.variants"),
    ],
)
def test_bad_search_settings_are_refused(search_cfg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"distill.search": search_cfg})


def test_the_chosen_loss_becomes_the_lineage():
    loss = LossConfig(name="auto03", kind="logit_mse", lam=0.5, transfer="both")
    tags = search.lineage(loss)
    assert tags["kdflow.loss"] == "logit_mse" and tags["kdflow.transfer"] == "both"
    assert tags["kdflow.search_settings"] == "kind=logit_mse, lam=0.5, transfer=both"
    assert math.isclose(float(tags["kdflow.lambda"]), 0.5)


def test_a_choice_reads_in_three_significant_digits():
    loss = LossConfig(name="auto01", kind="dist", temperature=1.0849009832, beta=1.0952254, gamma=0.69775199)
    assert search.describe(loss) == "kind=dist, temperature=1.08, beta=1.1, gamma=0.698, transfer=target"
