"""Unit tests for kdflow.objectives: every value is checked against a hand computation in plain Python floats."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from kdflow import objectives
from kdflow.config import LABELLED_TRANSFER_KINDS, OBJECTIVE_KINDS, STANDARDIZABLE_KINDS, LossConfig
from kdflow.errors import ConfigError

# Two samples, three classes: explicit numbers so the expected values are computed independently of torch.
STUDENT = [[1.0, 2.0, 0.5], [-0.3, 0.8, 2.2]]
TEACHER = [[2.5, 0.2, -1.0], [0.0, 1.5, 1.0]]
LABELS = [1, 2]
# The transfer-set logits the distillation terms of an objective use (student and teacher).
TRANSFER = [[0.1, -0.4, 1.3], [2.0, 0.0, -0.5]]
TEACHER_T = [[0.9, -1.2, 0.4], [1.0, 1.0, -2.0]]
# Three samples, four classes, for DIST: its intra-class term correlates over the batch, and two points always
# correlate ±1, so it needs a batch of three to be worth checking.
STUDENT3 = [[1.0, -0.5, 2.0, 0.3], [0.2, 1.1, -1.0, 0.0], [-0.7, 0.4, 0.9, 2.5]]
TEACHER3 = [[2.2, -1.0, 1.5, 0.0], [0.5, 2.0, -0.5, -1.5], [0.0, -0.3, 1.2, 3.0]]
LABELS3 = [2, 1, 3]


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


def _kl_list(p: list[float], q: list[float]) -> float:
    """KL(p ‖ q) of two probability lists."""
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _hand_dkd(student, teacher, labels, t: float) -> tuple[float, float]:
    """(TCKD, NCKD), T²-scaled batch means, from probabilities: b = (p_y, 1 − p_y), p̂_k = p_k / (1 − p_y)."""
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(student, teacher, labels):
        p_s, p_t = _softmax(s_row, t), _softmax(t_row, t)
        tckd += _kl_list([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        hat_s = [p / (1 - p_s[y]) for k, p in enumerate(p_s) if k != y]
        hat_t = [p / (1 - p_t[y]) for k, p in enumerate(p_t) if k != y]
        nckd += _kl_list(hat_t, hat_s)
    n = len(student)
    return t * t * tckd / n, t * t * nckd / n


def _hand_pearson(x: list[float], y: list[float], eps: float = 1e-8) -> float:
    """Pearson's r = Σ(x − x̄)(y − ȳ) / (‖x − x̄‖·‖y − ȳ‖ + eps): eps as in the DIST authors' code."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    num = sum((a - mx) * (b - my) for a, b in zip(x, y))
    den = math.sqrt(sum((a - mx) ** 2 for a in x)) * math.sqrt(sum((b - my) ** 2 for b in y))
    return num / (den + eps)


def _hand_dist(student, teacher, t: float) -> tuple[float, float]:
    """(inter, intra), T²-scaled: 1 − mean Pearson over the rows, resp. the columns, of the softened predictions."""
    p_s = [_softmax(row, t) for row in student]
    p_t = [_softmax(row, t) for row in teacher]
    inter = 1 - sum(_hand_pearson(a, b) for a, b in zip(p_s, p_t)) / len(p_s)
    cols_s, cols_t = list(zip(*p_s)), list(zip(*p_t))
    intra = 1 - sum(_hand_pearson(a, b) for a, b in zip(cols_s, cols_t)) / len(cols_s)
    return t * t * inter, t * t * intra


def _hand_standardize(row: list[float], eps: float = 1e-7) -> list[float]:
    """(z − mean) / (sample std + eps), the std with n − 1 as torch.std."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (std + eps) for v in row]


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


# ------------------------------------------------------------------------------ DKD, DIST, standardization


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("data", [(STUDENT, TEACHER, LABELS), (STUDENT3, TEACHER3, LABELS3)], ids=["2x3", "3x4"])
def test_dkd_terms_by_hand(temperature, data):
    student, teacher, labels = data
    tckd, nckd = objectives.dkd_terms(_t(student), _t(teacher), torch.tensor(labels), temperature)
    expected_tckd, expected_nckd = _hand_dkd(student, teacher, labels, temperature)
    assert expected_tckd > 0 and expected_nckd > 0
    assert tckd.ndim == nckd.ndim == 0
    assert float(tckd) == pytest.approx(expected_tckd, rel=1e-6)
    assert float(nckd) == pytest.approx(expected_nckd, rel=1e-6)


def test_dkd_terms_spelled_out_for_one_sample_at_t2():
    # Sample 0, label 1, T = 2. Binary: p_y = e^{2/2} / (e^{1/2} + e^{2/2} + e^{0.5/2}). Non-target: two classes
    # left (0 and 2), so p̂ is a logistic of their logit gap: p̂_0 = 1 / (1 + e^{−(z_0 − z_2)/T}).
    t = 2.0
    q = math.exp(2.0 / t) / (math.exp(1.0 / t) + math.exp(2.0 / t) + math.exp(0.5 / t))
    b = math.exp(0.2 / t) / (math.exp(2.5 / t) + math.exp(0.2 / t) + math.exp(-1.0 / t))
    tckd = b * math.log(b / q) + (1 - b) * math.log((1 - b) / (1 - q))
    hs0 = 1 / (1 + math.exp(-(1.0 - 0.5) / t))
    ht0 = 1 / (1 + math.exp(-(2.5 - (-1.0)) / t))
    nckd = ht0 * math.log(ht0 / hs0) + (1 - ht0) * math.log((1 - ht0) / (1 - hs0))
    got_tckd, got_nckd = objectives.dkd_terms(_t(STUDENT[:1]), _t(TEACHER[:1]), torch.tensor([1]), t)
    assert float(got_tckd) == pytest.approx(t * t * tckd, rel=1e-6)
    assert float(got_nckd) == pytest.approx(t * t * nckd, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_terms_decompose_hinton_kd(temperature):
    # The paper's Eq. 6, per sample: KL(p_T ‖ p_S) = TCKD + (1 − p_T,y)·NCKD (both sides T²-scaled here).
    for s_row, t_row, y in zip(STUDENT + TRANSFER, TEACHER + TEACHER_T, LABELS + LABELS):
        s, t = _t([s_row]), _t([t_row])
        tckd, nckd = objectives.dkd_terms(s, t, torch.tensor([y]), temperature)
        p_ty = _softmax(t_row, temperature)[y]
        kd = objectives.kd_kl(s, t, temperature)
        assert float(kd) == pytest.approx(float(tckd) + (1 - p_ty) * float(nckd), rel=1e-9)
        assert float(kd) == pytest.approx(temperature**2 * _hand_kl([s_row], [t_row], temperature), rel=1e-9)


def test_dkd_terms_identities():
    z, y = _t(TEACHER), torch.tensor(LABELS)
    tckd, nckd = objectives.dkd_terms(z.clone(), z, y, 4.0)
    assert float(tckd) == pytest.approx(0.0, abs=1e-12) and float(nckd) == pytest.approx(0.0, abs=1e-12)
    # a per-row shift of either set of logits changes no softmax
    base = objectives.dkd_terms(_t(STUDENT), z, y, 2.0)
    shifted = objectives.dkd_terms(_t(STUDENT) + _t([[3.0], [-1.0]]), z - 5.0, y, 2.0)
    assert [float(v) for v in shifted] == pytest.approx([float(v) for v in base], rel=1e-9)
    # the student matching only the non-target ranking (logits equal off the label) leaves NCKD at zero
    s = z.clone()
    s[0, LABELS[0]] += 2.0
    s[1, LABELS[1]] -= 1.0
    tckd, nckd = objectives.dkd_terms(s, z, y, 4.0)
    assert float(nckd) == pytest.approx(0.0, abs=1e-12) and float(tckd) > 0
    # two classes: nothing left to rank, NCKD is 0 and TCKD is the whole KL
    s2, t2 = _t([[0.3, 1.0], [2.0, -1.0]]), _t([[1.5, -0.5], [0.0, 0.4]])
    tckd, nckd = objectives.dkd_terms(s2, t2, torch.tensor([0, 1]), 2.0)
    assert float(nckd) == pytest.approx(0.0, abs=1e-12)
    assert float(tckd) == pytest.approx(float(objectives.kd_kl(s2, t2, 2.0)), rel=1e-9)


def test_dkd_terms_gradients_match_hand_formulas():
    # With q = p_S,y, b = p_T,y and p̂ the renormalised non-target probabilities, the T²-scaled batch means give
    #   d TCKD / dz_S = T·(q − b)/B at the label and −T·p̂_S,k·(q − b)/B elsewhere;
    #   d NCKD / dz_S = 0 at the label and T·(p̂_S,k − p̂_T,k)/B elsewhere.
    temperature, n = 3.0, len(STUDENT)
    for which in (0, 1):
        s = _t(STUDENT).requires_grad_(True)
        objectives.dkd_terms(s, _t(TEACHER), torch.tensor(LABELS), temperature)[which].backward()
        for i, (s_row, t_row, y) in enumerate(zip(STUDENT, TEACHER, LABELS)):
            p_s, p_t = _softmax(s_row, temperature), _softmax(t_row, temperature)
            q, b = p_s[y], p_t[y]
            for k in range(3):
                if which == 0:
                    expected = (q - b) if k == y else -p_s[k] / (1 - q) * (q - b)
                else:
                    expected = 0.0 if k == y else p_s[k] / (1 - q) - p_t[k] / (1 - b)
                assert float(s.grad[i, k]) == pytest.approx(temperature * expected / n, rel=1e-6, abs=1e-12)


def test_dkd_and_dist_terms_pass_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, 4, 3])
    assert torch.autograd.gradcheck(lambda z: objectives.dkd_terms(z, t, y, 2.0), (s,))
    assert torch.autograd.gradcheck(lambda z: objectives.dist_terms(z, t, 2.0), (s,))
    assert torch.autograd.gradcheck(lambda z: objectives.standardize(z), (s,))


def test_pearson_by_hand_and_its_bounds():
    a, b = _t(STUDENT3), _t(TEACHER3)
    got = objectives.pearson(a, b)
    assert got.shape == (3,)
    for i in range(3):
        assert float(got[i]) == pytest.approx(_hand_pearson(STUDENT3[i], TEACHER3[i]), rel=1e-9)
    # invariant to a positive affine map of either row (up to eps); −1 for a negative one; 0 against a constant row
    assert objectives.pearson(3.0 * a + 2.0, b).tolist() == pytest.approx(got.tolist(), rel=1e-7)
    assert objectives.pearson(-a, a).tolist() == pytest.approx([-1.0] * 3, rel=1e-7)
    assert objectives.pearson(torch.ones_like(a), b).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_dist_terms_by_hand(temperature):
    inter, intra = objectives.dist_terms(_t(STUDENT3), _t(TEACHER3), temperature)
    expected_inter, expected_intra = _hand_dist(STUDENT3, TEACHER3, temperature)
    assert expected_inter > 0 and expected_intra > 0
    assert inter.ndim == intra.ndim == 0
    assert float(inter) == pytest.approx(expected_inter, rel=1e-6)
    assert float(intra) == pytest.approx(expected_intra, rel=1e-6)


def test_dist_terms_identities():
    s, t = _t(STUDENT3), _t(TEACHER3)
    # a perfect match: both correlations 1 (up to the reference's eps)
    inter, intra = objectives.dist_terms(t.clone(), t, 4.0)
    assert float(inter) == pytest.approx(0.0, abs=1e-4) and float(intra) == pytest.approx(0.0, abs=1e-4)
    # T² times the terms of the logits divided by T
    at_t = objectives.dist_terms(s, t, 4.0)
    at_1 = objectives.dist_terms(s / 4.0, t / 4.0, 1.0)
    assert [float(v) for v in at_t] == pytest.approx([16.0 * float(v) for v in at_1], rel=1e-9)
    # permuting classes, or samples, of both alike changes neither term
    cls, smp = [2, 0, 3, 1], [1, 2, 0]
    base = [float(v) for v in at_t]
    assert [float(v) for v in objectives.dist_terms(s[:, cls], t[:, cls], 4.0)] == pytest.approx(base, rel=1e-9)
    assert [float(v) for v in objectives.dist_terms(s[smp], t[smp], 4.0)] == pytest.approx(base, rel=1e-9)
    # two classes: a student with the teacher's probabilities swapped correlates −1 in every sample
    t2 = _t([[1.0, -0.5], [0.2, 0.9], [2.0, 0.0]])
    inter, _ = objectives.dist_terms(t2.flip(1), t2, 1.0)
    assert float(inter) == pytest.approx(2.0, rel=1e-6)
    # every term lies in [0, 2·T²]
    for v in at_t:
        assert 0.0 <= float(v) <= 2 * 16.0


def test_dist_terms_gradient_sanity():
    # zero gradient at the optimum (student = teacher); elsewhere a small step against the gradient lowers both
    t = _t(TEACHER3)
    s = t.clone().requires_grad_(True)
    sum(objectives.dist_terms(s, t, 2.0)).backward()
    assert float(s.grad.abs().max()) < 1e-4
    s = _t(STUDENT3).requires_grad_(True)
    total = sum(objectives.dist_terms(s, t, 2.0))
    total.backward()
    total = total.detach()
    assert float(s.grad.abs().max()) > 1e-2
    with torch.no_grad():
        lower = sum(objectives.dist_terms(s - 1e-3 * s.grad, t, 2.0))
    assert float(lower) < float(total)
    # a batch of one: intra has nothing to correlate (T²·(1 − 0)), and the gradients stay finite
    one = _t(STUDENT3[:1]).requires_grad_(True)
    inter, intra = objectives.dist_terms(one, t[:1], 2.0)
    (inter + intra).backward()
    assert float(intra.detach()) == pytest.approx(4.0, rel=1e-12)
    assert torch.isfinite(one.grad).all()


def test_standardize_by_hand():
    got = objectives.standardize(_t(STUDENT))
    for i, row in enumerate(STUDENT):
        assert got[i].tolist() == pytest.approx(_hand_standardize(row), rel=1e-9)
    # spelled out for [1, 2, 0.5]: mean 7/6, sample variance ((−1/6)² + (5/6)² + (−2/3)²) / 2 = 7/12
    std = math.sqrt(7 / 12)
    assert got[0].tolist() == pytest.approx([(1 - 7 / 6) / std, (2 - 7 / 6) / std, (0.5 - 7 / 6) / std], rel=1e-6)
    assert got.mean(dim=1).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert got.std(dim=1).tolist() == pytest.approx([1.0, 1.0], rel=1e-6)


def _kd_ls(alpha: float = 0.9, temperature: float = 2.0) -> LossConfig:
    return LossConfig(name="kd_ls", kind="kd", alpha=alpha, temperature=temperature, standardize=True)


def test_objective_kd_standardized_by_hand():
    logits, labels, transfer, teacher, *_ = _inputs()
    alpha, t = 0.9, 2.0
    loss, parts = _objective(_kd_ls(alpha, t), logits, labels, transfer, teacher)
    z_s = [_hand_standardize(row) for row in TRANSFER]
    z_t = [_hand_standardize(row) for row in TEACHER_T]
    kd = t * t * _hand_kl(z_s, z_t, t)
    ce = _hand_ce(STUDENT, LABELS)  # the CE term keeps the raw logits
    assert kd != pytest.approx(t * t * _hand_kl(TRANSFER, TEACHER_T, t), rel=1e-3)  # it did change something
    assert parts == {"ce": pytest.approx(ce, rel=1e-6), "kd": pytest.approx(kd, rel=1e-6)}
    assert float(loss) == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-6)
    # α = 0: exactly the raw cross-entropy
    loss0, _ = _objective(_kd_ls(0.0, t), logits, labels, transfer, teacher)
    assert torch.equal(loss0, objectives.cross_entropy(logits, labels))


@pytest.mark.parametrize("kind", ["kd", "dkd"])
def test_standardized_loss_ignores_teacher_shift_and_scale(kind):
    logits, labels, transfer, teacher, *_ = _inputs()
    cfg = LossConfig(name="x", kind=kind, alpha=1.0, beta=8.0, temperature=2.0, standardize=True)
    base, _ = _objective(cfg, logits, labels, transfer, teacher)
    scale, shift = _t([[3.0], [0.25]]), _t([[-4.0], [10.0]])
    moved, _ = _objective(cfg, logits, labels, transfer, teacher * scale + shift)
    assert float(moved) == pytest.approx(float(base), rel=1e-6)
    # the student's transfer logits alike
    moved_s, _ = _objective(cfg, logits, labels, transfer * 5.0 - 1.0, teacher)
    assert float(moved_s) == pytest.approx(float(base), rel=1e-6)
    # without standardization scaling the teacher's logits changes the loss
    raw = cfg.model_copy(update={"standardize": False})
    a, _ = _objective(raw, logits, labels, transfer, teacher)
    b, _ = _objective(raw, logits, labels, transfer, teacher * scale + shift)
    assert float(a) != pytest.approx(float(b), rel=1e-3)


def test_objective_dkd_by_hand():
    logits, labels, transfer, teacher, *_ = _inputs()
    alpha, beta, t = 1.0, 8.0, 4.0  # the reference's CIFAR-100 setting
    cfg = LossConfig(name="dkd", kind="dkd", alpha=alpha, beta=beta, temperature=t)
    loss, parts = _objective(cfg, logits, labels, transfer, teacher)
    ce = _hand_ce(STUDENT, LABELS)
    tckd, nckd = _hand_dkd(TRANSFER, TEACHER_T, LABELS, t)
    assert parts == {
        "ce": pytest.approx(ce, rel=1e-6),
        "tckd": pytest.approx(tckd, rel=1e-6),
        "nckd": pytest.approx(nckd, rel=1e-6),
    }
    assert float(loss) == pytest.approx(ce + alpha * tckd + beta * nckd, rel=1e-6)
    # α = β = 0 is plain CE; standardized, the terms are those of the z-scored logits
    zero, _ = _objective(cfg.model_copy(update={"alpha": 0.0, "beta": 0.0}), logits, labels, transfer, teacher)
    assert torch.equal(zero, objectives.cross_entropy(logits, labels))
    ls = cfg.model_copy(update={"standardize": True})
    loss_ls, parts_ls = _objective(ls, logits, labels, transfer, teacher)
    z_s = [_hand_standardize(row) for row in TRANSFER]
    z_t = [_hand_standardize(row) for row in TEACHER_T]
    tckd_ls, nckd_ls = _hand_dkd(z_s, z_t, LABELS, t)
    assert parts_ls["ce"] == pytest.approx(ce, rel=1e-6)
    assert float(loss_ls) == pytest.approx(ce + alpha * tckd_ls + beta * nckd_ls, rel=1e-6)


def test_objective_dist_by_hand():
    logits, labels = _t(STUDENT3), torch.tensor(LABELS3)
    transfer, teacher = _t(STUDENT3) * 0.5 + 0.1, _t(TEACHER3)
    beta, gamma, t = 2.0, 3.0, 4.0
    cfg = LossConfig(name="dist", kind="dist", beta=beta, gamma=gamma, temperature=t)
    loss, parts = _objective(cfg, logits, labels, transfer, teacher)
    ce = _hand_ce(STUDENT3, LABELS3)
    inter, intra = _hand_dist([[0.5 * v + 0.1 for v in row] for row in STUDENT3], TEACHER3, t)
    assert parts == {
        "ce": pytest.approx(ce, rel=1e-6),
        "inter": pytest.approx(inter, rel=1e-6),
        "intra": pytest.approx(intra, rel=1e-6),
    }
    assert float(loss) == pytest.approx(ce + beta * inter + gamma * intra, rel=1e-6)
    assert LossConfig(name="d", kind="dist").gamma == 1.0  # the authors' default weights are β = γ = 1


def test_dkd_and_dist_use_teacher_logits_not_features():
    """What the teacher step's output cache and `candidate_groups` go by: both need the teacher's logits only."""
    for kind in ("dkd", "dist"):
        obj = objectives.build(LossConfig(name="x", kind=kind))
        assert obj.needs_teacher and not obj.needs_features and not obj.uses_source_data
        assert obj.make_adapter(4, 8) is None
    assert objectives.build(LossConfig(name="x", kind="dist", transfer="both")).uses_source_data


def test_objective_flags_match_config_kinds():
    """`kdflow.config` validates `standardize` and dkd's transfer without torch: its kind lists must match."""
    cls = objectives.OBJECTIVES
    assert {k for k in cls if cls[k].standardizable} == set(STANDARDIZABLE_KINDS)
    assert {k for k in cls if cls[k].needs_labelled_transfer} == set(LABELLED_TRANSFER_KINDS)


@pytest.mark.parametrize("transfer", ["source", "both"])
def test_dkd_built_past_validation_refuses_unlabelled_transfer(transfer):
    bad = LossConfig.model_construct(name="mydkd", kind="dkd", transfer=transfer)
    with pytest.raises(ConfigError, match=f"loss 'mydkd' of kind 'dkd'.*got transfer: '{transfer}'"):
        objectives.build(bad)


def test_standardize_built_past_validation_is_refused_for_other_kinds():
    bad = LossConfig.model_construct(name="m", kind="logit_mse", standardize=True)
    with pytest.raises(ConfigError, match="standardize: true does not apply to loss 'm' of kind 'logit_mse'"):
        objectives.build(bad)


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


@pytest.mark.parametrize("kind", ["ce", "kd", "logit_mse", "hint", "dkd", "dist"])
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


@pytest.mark.parametrize(
    "kind, tags",
    [
        ("ce", {}),  # the baseline reads none of them: no T, α or λ on its run
        ("kd", {"kdflow.temperature": "4.0", "kdflow.alpha": "0.9", "kdflow.standardize": "False",
                "kdflow.transfer": "target"}),
        ("logit_mse", {"kdflow.lambda": "1.0", "kdflow.transfer": "target"}),
        ("hint", {"kdflow.temperature": "4.0", "kdflow.alpha": "0.9", "kdflow.beta": "1.0",
                  "kdflow.transfer": "target"}),
        ("dkd", {"kdflow.temperature": "4.0", "kdflow.alpha": "0.9", "kdflow.beta": "1.0",
                 "kdflow.standardize": "False", "kdflow.transfer": "target"}),
        ("dist", {"kdflow.temperature": "4.0", "kdflow.beta": "1.0", "kdflow.gamma": "1.0",
                  "kdflow.transfer": "target"}),
    ],
)  # fmt: skip
def test_only_the_settings_a_kind_reads_are_recorded(kind, tags):
    from kdflow.objectives import OBJECTIVES, setting_tags, used_settings

    cfg = LossConfig(name="x", kind=kind)
    assert setting_tags(cfg) == tags
    assert set(used_settings(cfg)) == set(OBJECTIVES[kind].settings)
