"""The run's evidence: each distilled candidate against its student's `ce` candidate, and the weak-teacher flag;
the selection's stated reason; the `ce` baseline added to a grid without one."""

from __future__ import annotations

import numpy as np
import pytest

from kdflow import evidence, stats
from kdflow.config import PolicyConfig, load_config
from kdflow.registry import Candidate, explain, select


def _scored(name, student, kind, val, correct):
    return evidence.Scored(name, student, kind, {"val_top1": val}, np.asarray(correct, bool))


def test_each_distilled_candidate_is_paired_with_its_own_students_ce():
    a_ce = [1, 1, 0, 0, 1, 0, 1, 0]
    a_kd = [1, 1, 1, 1, 1, 0, 1, 0]  # +2 images over a-ce
    b_ce = [1, 1, 1, 1, 1, 1, 1, 1]
    b_kd = [1, 1, 1, 1, 0, 0, 0, 1]  # -3 images under b-ce
    ev = evidence.gather(
        [
            _scored("a-kd", "a", "kd", 0.9, a_kd),
            _scored("a-ce", "a", "ce", 0.8, a_ce),
            _scored("b-kd", "b", "kd", 0.7, b_kd),
            _scored("b-ce", "b", "ce", 0.85, b_ce),
            _scored("c-kd", "c", "kd", 0.6, b_kd),  # no ce candidate for student c: no gain
        ],
        teacher_val_top1=0.95,
    )
    assert ev.baseline == {"a-kd": "a-ce", "b-kd": "b-ce"}
    assert ev.gains["a-kd"] == stats.paired_gain(np.array(a_kd, bool), np.array(a_ce, bool))
    assert ev.gains["a-kd"].diff == pytest.approx(2 / 8) and ev.gains["b-kd"].diff == pytest.approx(-3 / 8)
    assert (ev.gains["b-kd"].a_only, ev.gains["b-kd"].b_only) == (0, 3)
    assert set(ev.metrics("a-kd")) == {
        "gain_vs_ce_test_top1",
        "gain_vs_ce_ci_low",
        "gain_vs_ce_ci_high",
        "gain_vs_ce_p_value",
    }
    assert ev.metrics("a-ce") == {} and ev.metrics("c-kd") == {}
    assert ev.metrics("b-kd")["gain_vs_ce_p_value"] == pytest.approx(stats.mcnemar_exact(0, 3))  # 0.25
    assert not ev.weak_teacher and ev.summary()["gains_vs_ce"]["a-kd"]["shown"] == ev.gains["a-kd"].format()


def test_a_teacher_below_a_ce_student_on_validation_is_weak():
    ev = evidence.gather([_scored("a-ce", "a", "ce", 0.874, [1]), _scored("a-kd", "a", "kd", 0.81, [0])], 0.835)
    assert ev.weak_teacher
    assert ev.weak_teacher_reason.startswith("weak teacher: its val top-1 83.50% is below the 87.40% of a-ce")
    assert not evidence.gather([_scored("a-ce", "a", "ce", 0.874, [1])], 0.874).weak_teacher  # equal: not weaker


def test_selection_states_the_margin_in_images_or_the_tie_break():
    def cand(name, val, loss, params=100):
        return Candidate(name, {"val_top1": val, "val_loss": loss, "params": params, "latency_ms_b1": 1.0})

    teacher = {"params": 1000, "val_top1": 1.0}
    policy = PolicyConfig()
    tied = select([cand("a", 1.0, 0.30), cand("b", 1.0, 0.20), cand("c", 0.99, 0.1)], policy, teacher, 197)
    assert tied.best.name == "b"
    assert tied.why == "tied at 100.00% val_top1 on 197 images (b, a); chose b by lower val loss (0.2000 vs 0.3000)"
    lead = select([cand("a", 270 / 276, 0.3), cand("b", 268 / 276, 0.1)], policy, teacher, 276)
    assert lead.why == "a leads b on val_top1: 97.83% vs 97.10% (0.72%, 2 of 276 validation images)"
    same = [cand("a", 0.5, 0.2, 90), cand("b", 0.5, 0.2, 80)]
    assert select(same, policy, teacher).why == "tied at 50.00% val_top1 (b, a); chose b by fewer params (80 vs 90)"
    assert explain([cand("a", 0.5, 0.2)], "val_top1") == "a is the only candidate that satisfies the policy"


PRUNED = {  # the schema's default students: the two pruned teachers
    "prune.ratios": [0.6, 0.75],
    "distill.students": [{"name": "pruned60", "from_pruned": 0.6}, {"name": "pruned75", "from_pruned": 0.75}],
}


def test_a_grid_without_ce_gets_the_baseline_unless_the_config_says_not_to():
    kd_only = {**PRUNED, "distill.losses": [{"name": "kd", "kind": "kd"}, {"name": "ce", "kind": "logit_mse"}]}
    names = [c.name for c in load_config(None, kd_only).candidates()]
    assert names == [
        "pruned60-kd",
        "pruned60-ce",
        "pruned60-ce_baseline",
        "pruned75-kd",
        "pruned75-ce",
        "pruned75-ce_baseline",
    ]
    baseline = load_config(None, kd_only).candidate("pruned60-ce_baseline").loss
    assert (baseline.kind, baseline.name) == ("ce", "ce_baseline")
    off = load_config(None, {**kd_only, "distill.ce_baseline": False})
    assert [c.name for c in off.candidates()] == ["pruned60-kd", "pruned60-ce", "pruned75-kd", "pruned75-ce"]
    default = load_config(None, {})  # the default grid has a ce loss already: nothing added
    assert [c.loss.name for c in default.candidates()][:3] == ["kd", "logit_mse", "ce"]


def test_scratch_baselines_add_each_pruned_students_architecture_from_random_weights():
    cfg = load_config(None, {**PRUNED, "distill.scratch_baselines": True})
    extra = [c for c in cfg.candidates() if c.student.reinit]
    assert [(c.name, c.student.from_pruned, c.loss.kind, c.student.init) for c in extra] == [
        ("pruned60_scratch-ce", 0.6, "ce", "scratch"),
        ("pruned75_scratch-ce", 0.75, "ce", "scratch"),
    ]
    assert cfg.candidate("pruned60-ce").student.init == "pruned"
    assert len(cfg.candidates()) == len(load_config(None, PRUNED).candidates()) + 2
    assert not any(c.student.reinit for c in load_config(None, {"distill.scratch_baselines": True}).candidates())
    from kdflow.config import ConfigError

    with pytest.raises(ConfigError, match="reinit applies to a pruned student"):
        load_config(None, {"distill.students": [{"name": "s", "arch": "cnn", "reinit": True}]})


def test_reinitialize_keeps_shapes_and_draws_new_weights_from_the_seed():
    import torch

    from kdflow import models

    torch.manual_seed(0)
    net = models.build("cnn", 1, 4, width=8)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
    torch.manual_seed(7)
    models.reinitialize(net)
    torch.manual_seed(7)
    fresh = models.build("cnn", 1, 4, width=8)
    torch.manual_seed(7)
    models.reinitialize(fresh)
    for (name, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), name  # same seed, same draws, whatever came before
    assert all(not torch.all(p == 0.5) for p in net.parameters() if p.dim() > 1)
    assert all(torch.all(m.running_mean == 0) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_a_pruned_students_candidates_are_also_compared_with_its_scratch_twin():
    pruned_ce, scratch_ce = [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]
    ev = evidence.gather(
        [
            evidence.Scored("p-kd", "p", "kd", {"val_top1": 0.9}, np.array([1, 1, 1, 1, 0, 0], bool), "pruned"),
            evidence.Scored("p-ce", "p", "ce", {"val_top1": 0.8}, np.array(pruned_ce, bool), "pruned"),
            evidence.Scored(
                "p_scratch-ce", "p_scratch", "ce", {"val_top1": 0.5}, np.array(scratch_ce, bool), "scratch"
            ),
        ],
        teacher_val_top1=0.95,
    )
    assert ev.baseline == {"p-kd": "p-ce"}  # the scratch twin is its own student: it has no ce baseline to beat
    assert ev.scratch == {"p-kd": "p_scratch-ce", "p-ce": "p_scratch-ce"}
    assert ev.scratch_gains["p-ce"].diff == pytest.approx(2 / 6)  # what the pruned teacher's weights are worth
    assert ev.scratch_gains["p-kd"].diff == pytest.approx(3 / 6)
    assert ev.metrics("p-ce") == {
        "gain_vs_scratch_test_top1": ev.scratch_gains["p-ce"].diff,
        "gain_vs_scratch_ci_low": ev.scratch_gains["p-ce"].ci_low,
        "gain_vs_scratch_ci_high": ev.scratch_gains["p-ce"].ci_high,
        "gain_vs_scratch_p_value": ev.scratch_gains["p-ce"].p_value,
    }


def test_the_final_table_shows_the_evidence_and_says_when_nothing_won(monkeypatch):
    import io

    from rich.console import Console

    from kdflow import cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=200))
    row = {"params": 1000, "macs": 223_306, "latency_ms_b1": 0.5, "teacher_agreement": 0.99, "compression": 6.5}
    g = stats.paired_gain(np.array([1, 1, 1, 0] * 25, bool), np.array([1, 1, 0, 0] * 25, bool))
    summary = {
        "model_name": "m",
        "teacher": {
            "val_top1": 0.9,
            "test_top1": 0.91,
            "params": 65834,
            "macs": 1_493_632,
            "latency_ms_b1": 0.7,
            "version": 1,
        },
        "candidates": {
            "s-kd": {**row, "val_top1": 0.95, "test_top1": 0.75, "version": 1},
            "s-ce": {**row, "val_top1": 0.96, "test_top1": 0.5, "version": 2},
        },
        "decision": {
            "champion_version": 2,
            "selected": "s-ce",
            "rejected": {},
            "promoted": True,
            "reason": "s-ce is the first champion (test_top1=0.5000)",
            "selection_reason": "s-ce leads s-kd on val_top1: 96.00% vs 95.00% (1.00%)",
        },
        "evidence": {
            **evidence.Evidence(baseline={"s-kd": "s-ce"}, gains={"s-kd": g}).summary(),
            "weak_teacher": True,
            "weak_teacher_reason": "weak teacher: its val top-1 90.00% is below the 96.00% of s-ce",
        },
    }
    cli._print_summary(summary)
    text = out.getvalue()
    kd_row = next(line for line in text.splitlines() if "s-kd" in line and "%" in line)
    assert "+25.0 [" in kd_row and "]*" in kd_row  # 25 images won, none lost: starred
    assert "223k" in kd_row and "1.49M" in next(line for line in text.splitlines() if "│ teacher" in line)
    ce_row = next(line for line in text.splitlines() if "s-ce" in line and "%" in line)
    assert "baseline" in ce_row and "champion" in ce_row
    assert "weak teacher: its val top-1 90.00% is below the 96.00% of s-ce" in text
    assert "selected: s-ce leads s-kd on val_top1" in text
    assert "no distilled candidate beat" not in text  # one did
    summary["evidence"]["gains_vs_ce"]["s-kd"].update(ci_low=-0.01, p_value=0.2)
    out.truncate(0)
    cli._print_summary(summary)
    assert "no distilled candidate beat its ce baseline beyond noise in this run" in out.getvalue()
