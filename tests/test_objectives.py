"""Unit tests for kdflow.objectives: every value is checked against a hand computation in plain Python floats."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from kdflow import objectives
from kdflow.config import OBJECTIVE_KINDS, LossConfig
from kdflow.errors import ConfigError

# Two samples, three classes: explicit numbers so the expected values are computed independently of torch.
STUDENT = [[1.0, 2.0, 0.5], [-0.3, 0.8, 2.2]]
TEACHER = [[2.5, 0.2, -1.0], [0.0, 1.5, 1.0]]
LABELS = [1, 2]
# The transfer-set logits the distillation terms of an objective use (student and teacher).
TRANSFER = [[0.1, -0.4, 1.3], [2.0, 0.0, -0.5]]
TEACHER_T = [[0.9, -1.2, 0.4], [1.0, 1.0, -2.0]]


class Adapted(nn.Module):
    """The adapter for student features that already have the teacher's shape: hands them on unchanged."""

    def forward(self, student_features: torch.Tensor, teacher_hw: tuple[int, int]) -> torch.Tensor:
        assert tuple(student_features.shape[-2:]) == tuple(teacher_hw)
        return student_features


def _raw(
    cfg: LossConfig,
    logits: torch.Tensor,
    labels: torch.Tensor,
    student: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
    student_features: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    adapter: nn.Module | None = None,
):
    """The objective `cfg` describes on these outputs: (loss, logged parts as tensors)."""
    out = objectives.Outputs(logits, labels, student, teacher, student_features, teacher_features)
    return objectives.build(cfg)(out, adapter)


def _objective(*args, **kwargs):
    """`_raw` with its logged parts as floats."""
    loss, parts = _raw(*args, **kwargs)
    return loss, {k: float(v) for k, v in parts.items()}


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _log_softmax(row: list[float], t: float = 1.0) -> list[float]:
    scaled = [v / t for v in row]
    lse = math.log(sum(math.exp(v) for v in scaled))
    return [v - lse for v in scaled]


def _hand_ce(logits: list[list[float]], labels: list[int]) -> float:
    return sum(-_log_softmax(row)[y] for row, y in zip(logits, labels)) / len(logits)


def _hand_kl(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """Batch mean of KL(p_teacher ‖ p_student) of the T-softened distributions (no T² factor)."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p_t = _softmax(t_row, t)
        log_p_t = _log_softmax(t_row, t)
        log_p_s = _log_softmax(s_row, t)
        total += sum(p * (lt - ls) for p, lt, ls in zip(p_t, log_p_t, log_p_s))
    return total / len(student)


def _hand_mse(student: list[list[float]], teacher: list[list[float]]) -> float:
    return sum(sum((a - b) ** 2 for a, b in zip(s, t)) for s, t in zip(student, teacher)) / len(student)


# ------------------------------------------------------------------------------------------ the pure losses


def test_cross_entropy_by_hand():
    # sample 0: -log(e^2 / (e^1 + e^2 + e^0.5)); sample 1: -log(e^2.2 / (e^-0.3 + e^0.8 + e^2.2))
    s0 = -(2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)))
    s1 = -(2.2 - math.log(math.exp(-0.3) + math.exp(0.8) + math.exp(2.2)))
    expected = (s0 + s1) / 2
    # the helper used below agrees with the spelled-out form
    assert expected == pytest.approx(_hand_ce(STUDENT, LABELS), rel=1e-12)
    got = objectives.cross_entropy(_t(STUDENT), torch.tensor(LABELS))
    assert got.ndim == 0
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_takes_logits_not_probabilities():
    # Uniform logits → CE = log(3) whatever the label.
    got = objectives.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 2]))
    assert float(got) == pytest.approx(math.log(3), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_kl_by_hand_with_exact_t_squared(temperature):
    expected_kl = _hand_kl(STUDENT, TEACHER, temperature)
    assert expected_kl > 0
    got = objectives.kd_kl(_t(STUDENT), _t(TEACHER), temperature)
    assert got.ndim == 0
    assert float(got) == pytest.approx(temperature**2 * expected_kl, rel=1e-5)


def test_kd_kl_at_t4_is_16_times_softened_kl_spelled_out():
    # Sample 0 spelled out entirely at T = 4, without the helpers.
    t = 4.0
    ts = [2.5 / t, 0.2 / t, -1.0 / t]
    ss = [1.0 / t, 2.0 / t, 0.5 / t]
    zt = math.exp(ts[0]) + math.exp(ts[1]) + math.exp(ts[2])
    zs = math.exp(ss[0]) + math.exp(ss[1]) + math.exp(ss[2])
    kl0 = sum((math.exp(a) / zt) * ((a - math.log(zt)) - (b - math.log(zs))) for a, b in zip(ts, ss))
    got = objectives.kd_kl(_t(STUDENT[:1]), _t(TEACHER[:1]), t)
    assert float(got) == pytest.approx(16.0 * kl0, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_kd_kl_is_zero_when_student_equals_teacher(temperature):
    z = _t(TEACHER)
    assert float(objectives.kd_kl(z.clone(), z, temperature)) == pytest.approx(0.0, abs=1e-10)


def test_kd_kl_is_direction_teacher_to_student():
    # KL is asymmetric: swapping the arguments gives the other direction, which the hand formula tells apart.
    forward = _hand_kl(STUDENT, TEACHER, 2.0)
    backward = _hand_kl(TEACHER, STUDENT, 2.0)
    assert forward != pytest.approx(backward, rel=1e-3)
    got = float(objectives.kd_kl(_t(STUDENT), _t(TEACHER), 2.0))
    assert got == pytest.approx(4.0 * forward, rel=1e-5)


def test_kd_kl_temperature_invariances():
    s, t = _t(STUDENT), _t(TEACHER)
    base = float(objectives.kd_kl(s, t, 2.0)) / 2.0**2
    # Scaling the logits and T together leaves the softened distributions, hence KL / T², unchanged.
    scaled = float(objectives.kd_kl(3.0 * s, 3.0 * t, 6.0)) / 6.0**2
    assert scaled == pytest.approx(base, rel=1e-6)
    # A per-row constant shift of either set of logits does not change a softmax.
    shifted = float(objectives.kd_kl(s + torch.tensor([[5.0], [-2.0]], dtype=s.dtype), t - 7.0, 2.0)) / 4.0
    assert shifted == pytest.approx(base, rel=1e-6)
    # High-temperature limit (Hinton et al. §2.1): T²·KL → Σ_k (Δ_k − mean Δ)² / (2K), Δ = z_t − z_s, i.e.
    # the T² scaling turns KD into (centred) logit matching instead of letting it vanish.
    limit = 0.0
    for s_row, t_row in zip(STUDENT, TEACHER):
        delta = [a - b for a, b in zip(t_row, s_row)]
        mean = sum(delta) / 3
        limit += sum((d - mean) ** 2 for d in delta) / (2 * 3)
    limit /= len(STUDENT)
    assert float(objectives.kd_kl(s, t, 1000.0)) == pytest.approx(limit, rel=1e-3)


def test_kd_kl_gradient_matches_hand_formula():
    # d/dz_s [T² · KL(p_t ‖ p_s)] / B-mean = T · (p_s − p_t) / B
    temperature = 3.0
    s = _t(STUDENT).requires_grad_(True)
    objectives.kd_kl(s, _t(TEACHER), temperature).backward()
    for i, (s_row, t_row) in enumerate(zip(STUDENT, TEACHER)):
        p_s, p_t = _softmax(s_row, temperature), _softmax(t_row, temperature)
        for k in range(3):
            expected = temperature * (p_s[k] - p_t[k]) / len(STUDENT)
            assert float(s.grad[i, k]) == pytest.approx(expected, rel=1e-5)


def test_logit_mse_by_hand():
    # sample 0: 1.5² + 1.8² + 1.5² = 7.74; sample 1: 0.3² + 0.7² + 1.2² = 2.02; mean 4.88
    expected = (1.5**2 + 1.8**2 + 1.5**2 + 0.3**2 + 0.7**2 + 1.2**2) / 2
    assert expected == pytest.approx(4.88, rel=1e-12)
    assert expected == pytest.approx(_hand_mse(STUDENT, TEACHER), rel=1e-12)
    got = objectives.logit_mse(_t(STUDENT), _t(TEACHER))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(objectives.logit_mse(_t(TEACHER), _t(STUDENT))) == pytest.approx(expected, rel=1e-5)
    assert float(objectives.logit_mse(_t(TEACHER), _t(TEACHER))) == 0.0


def test_feature_hint_by_hand():
    a = [[[[1.0, 2.0], [3.0, 4.0]], [[0.0, -1.0], [2.0, 0.5]]]]  # (1, 2, 2, 2)
    b = [[[[0.5, 2.0], [1.0, 4.0]], [[1.0, -1.0], [0.0, 0.0]]]]
    diffs = [0.5, 0.0, 2.0, 0.0, -1.0, 0.0, 2.0, 0.5]
    expected = sum(d * d for d in diffs) / 8  # mean over all B·C·H·W elements = 9.5 / 8
    got = objectives.feature_hint(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(got) == pytest.approx(9.5 / 8, rel=1e-12)


# ---------------------------------------------------------------------------------------------- registry


def test_config_kinds_are_the_registered_objectives():
    """`kdflow.config` names the kinds without importing torch; every one must have its objective class."""
    assert set(OBJECTIVE_KINDS) == set(objectives.OBJECTIVES)
    for kind in OBJECTIVE_KINDS:
        obj = objectives.build(LossConfig(name="x", kind=kind))
        assert isinstance(obj, objectives.OBJECTIVES[kind]) and obj.kind == kind


def test_unknown_kind_is_refused_with_every_valid_kind():
    bad = LossConfig.model_construct(name="x", kind="nope")  # past validation, as a stale config could be
    with pytest.raises(ConfigError, match="unknown objective kind 'nope'") as err:
        objectives.build(bad)
    listed = re.search(r"valid kinds: (.*)$", str(err.value)).group(1).split(", ")
    assert sorted(listed) == sorted(OBJECTIVE_KINDS)


# ---------------------------------------------------------------------------------------------- objective


def _inputs():
    """Labelled logits, transfer-set student/teacher logits, and hint features, all distinct."""
    logits = _t(STUDENT)
    labels = torch.tensor(LABELS)
    transfer = _t(TRANSFER)
    teacher = _t(TEACHER_T)
    feats_s = torch.arange(16, dtype=torch.float64).view(2, 2, 2, 2) / 10.0
    feats_t = torch.ones(2, 2, 2, 2, dtype=torch.float64)
    return logits, labels, transfer, teacher, feats_s, feats_t


def test_objective_ce_ignores_teacher():
    logits, labels, transfer, teacher, *_ = _inputs()
    cfg = LossConfig(name="ce", kind="ce")
    loss_a, parts_a = _objective(cfg, logits, labels)
    loss_b, parts_b = _objective(cfg, logits, labels, transfer, teacher)
    expected = _hand_ce(STUDENT, LABELS)
    assert float(loss_a) == pytest.approx(expected, rel=1e-5)
    assert torch.equal(loss_a, loss_b)
    assert parts_a == parts_b == {"ce": pytest.approx(expected, rel=1e-5)}
    assert not objectives.build(cfg).needs_teacher


def test_objective_kd_alpha0_is_plain_cross_entropy_exactly():
    logits, labels, transfer, teacher, *_ = _inputs()
    cfg = LossConfig(name="kd", kind="kd", alpha=0.0, temperature=4.0)
    loss, parts = _objective(cfg, logits, labels, transfer, teacher)
    assert torch.equal(loss, objectives.cross_entropy(logits, labels))
    assert float(loss) == pytest.approx(_hand_ce(STUDENT, LABELS), rel=1e-5)
    assert set(parts) == {"ce", "kd"}
    assert objectives.build(cfg).needs_teacher


def test_objective_kd_alpha1_is_kd_only():
    logits, labels, transfer, teacher, *_ = _inputs()
    cfg = LossConfig(name="kd", kind="kd", alpha=1.0, temperature=4.0)
    loss, parts = _objective(cfg, logits, labels, transfer, teacher)
    assert torch.equal(loss, objectives.kd_kl(transfer, teacher, 4.0))
    assert float(loss) == pytest.approx(16.0 * _hand_kl(TRANSFER, TEACHER_T, 4.0), rel=1e-5)
    assert parts["kd"] == pytest.approx(float(loss), rel=1e-12)
    assert parts["ce"] == pytest.approx(_hand_ce(STUDENT, LABELS), rel=1e-5)  # still logged, weight 0


def test_objective_kd_mixes_by_alpha_and_uses_transfer_logits():
    logits, labels, transfer, teacher, *_ = _inputs()
    alpha, t = 0.7, 2.0
    cfg = LossConfig(name="kd", kind="kd", alpha=alpha, temperature=t)
    loss, parts = _objective(cfg, logits, labels, transfer, teacher)
    ce = _hand_ce(STUDENT, LABELS)
    kd = t * t * _hand_kl(TRANSFER, TEACHER_T, t)
    assert float(loss) == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)
    assert parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert parts["kd"] == pytest.approx(kd, rel=1e-5)
    assert all(isinstance(v, float) for v in parts.values())
    _, raw = _raw(cfg, logits, labels, transfer, teacher)
    assert all(v.dim() == 0 and not v.requires_grad for v in raw.values())  # detached: no sync per step


def test_objective_logit_mse_by_hand():
    logits, labels, transfer, teacher, *_ = _inputs()
    lam = 0.25
    cfg = LossConfig(name="mse", kind="logit_mse", lam=lam)
    loss, parts = _objective(cfg, logits, labels, transfer, teacher)
    ce = _hand_ce(STUDENT, LABELS)
    # (0.8² + 0.8² + 0.9²) and (1² + 1² + 1.5²) → (2.09 + 4.25) / 2 = 3.17
    mse = (0.8**2 + 0.8**2 + 0.9**2 + 1.0**2 + 1.0**2 + 1.5**2) / 2
    assert mse == pytest.approx(_hand_mse(TRANSFER, TEACHER_T), rel=1e-12)
    assert float(loss) == pytest.approx(ce + lam * mse, rel=1e-5)
    assert parts == {"ce": pytest.approx(ce, rel=1e-5), "logit_mse": pytest.approx(mse, rel=1e-5)}


def test_objective_hint_adds_beta_times_hint():
    logits, labels, transfer, teacher, feats_s, feats_t = _inputs()
    alpha, t, beta = 0.5, 4.0, 3.0
    cfg = LossConfig(name="hint", kind="hint", alpha=alpha, temperature=t, beta=beta)
    loss, parts = _objective(cfg, logits, labels, transfer, teacher, feats_s, feats_t, adapter=Adapted())
    ce = _hand_ce(STUDENT, LABELS)
    kd = t * t * _hand_kl(TRANSFER, TEACHER_T, t)
    hint = sum((i / 10.0 - 1.0) ** 2 for i in range(16)) / 16
    assert float(loss) == pytest.approx((1 - alpha) * ce + alpha * kd + beta * hint, rel=1e-5)
    assert set(parts) == {"ce", "kd", "hint"}
    assert parts["hint"] == pytest.approx(hint, rel=1e-5)
    # beta = 0 → exactly the kd objective with the same alpha / T
    kd_cfg = LossConfig(name="kd", kind="kd", alpha=alpha, temperature=t)
    hint0 = LossConfig(name="hint", kind="hint", alpha=alpha, temperature=t, beta=0.0)
    a, _ = _objective(hint0, logits, labels, transfer, teacher, feats_s, feats_t, adapter=Adapted())
    b, _ = _objective(kd_cfg, logits, labels, transfer, teacher)
    assert float(a) == pytest.approx(float(b), rel=1e-12)


@pytest.mark.parametrize("kind", ["ce", "kd", "logit_mse", "hint"])
def test_objective_gradients_reach_student_only(kind):
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    teacher = nn.Linear(4, 3)
    adapter = objectives.HintAdapter(2, 3)
    x = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        t_logits = teacher(x)
    t_feats = torch.randn(5, 3, 2, 2)
    s_logits = student(x)
    s_feats = s_logits[:, :2, None, None].expand(5, 2, 4, 4)  # the hint objective adapts them to (2, 2)
    cfg = LossConfig(name="x", kind=kind, alpha=0.5)
    loss, _ = _objective(cfg, s_logits, y, s_logits, t_logits.detach(), s_feats, t_feats, adapter=adapter)
    assert loss.requires_grad
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert student.bias.grad is not None and student.bias.grad.abs().sum() > 0
    if kind == "hint":
        assert adapter.proj.weight.grad is not None and adapter.proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- HintAdapter


def test_hint_adapter_same_size_is_a_1x1_projection():
    torch.manual_seed(0)
    adapter = objectives.HintAdapter(student_channels=4, teacher_channels=6)
    x = torch.randn(2, 4, 5, 5)
    out = adapter(x, (5, 5))
    assert out.shape == (2, 6, 5, 5)
    w = adapter.proj.weight.view(6, 4)
    expected = torch.einsum("oc,bchw->bohw", w, x) + adapter.proj.bias.view(1, 6, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_hint_adapter_pools_to_teacher_size():
    torch.manual_seed(0)
    adapter = objectives.HintAdapter(student_channels=3, teacher_channels=5)
    x = torch.randn(2, 3, 8, 8)
    out = adapter(x, (4, 4))
    assert out.shape == (2, 5, 4, 4)
    # 8 → 4 adaptive pooling is a 2×2 mean of the projection
    proj = adapter.proj(x)
    expected = proj.view(2, 5, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # non-divisible and non-square targets still come out at the teacher's size
    assert adapter(x, (3, 5)).shape == (2, 5, 3, 5)
    assert adapter(torch.randn(1, 3, 7, 7), (1, 1)).shape == (1, 5, 1, 1)
    torch.testing.assert_close(adapter(x, (1, 1)), proj.mean(dim=(2, 3), keepdim=True), rtol=1e-5, atol=1e-6)


def test_hint_adapter_feeds_feature_hint():
    torch.manual_seed(0)
    adapter = objectives.HintAdapter(2, 4)
    s = torch.randn(3, 2, 6, 6)
    t = torch.randn(3, 4, 3, 3)
    loss = objectives.feature_hint(adapter(s, tuple(t.shape[-2:])), t)
    loss.backward()
    assert adapter.proj.weight.grad is not None and adapter.proj.weight.grad.abs().sum() > 0
