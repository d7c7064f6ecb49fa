"""Which candidate ships: the selection policy on validation data and the champion gate on test data.

Policy (stated, configurable): among candidates that satisfy every constraint — compression ≥
`min_compression` (teacher params / student params), params ≤ `max_params`, batch-1 CPU latency ≤
`max_latency_ms`, val accuracy ≥ `min_teacher_retention` × the teacher's — pick the best `metric` on the
validation split (ties: lower val loss, then fewer parameters, then name). Test data plays no part in that choice.

Gate: the selected candidate takes the alias only if its test metric beats the current champion's on the same
test data (by more than `min_improvement`). All versions are registered either way, so every run stays
comparable in the registry; only the alias moves or stays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from kdflow.config import PolicyConfig, RegistryConfig
from kdflow.stats import Gain

TEST_HASH_TAG = "kdflow.test_data_hash"


@dataclass
class Candidate:
    name: str
    metrics: dict[str, float]
    run_id: str = ""
    model_uri: str = ""
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Selection:
    best: Candidate | None
    rejected: dict[str, str]  # candidate name → why it failed the policy
    why: str = ""  # why `best` and not the runner-up: the validation margin, or the tie-break used


TOP5_MIN_CLASSES = 6  # top-5 accuracy is measured only with more than 5 classes (with 5 or fewer it is always 1)


def check_metrics(cfg: RegistryConfig, num_classes: int) -> None:
    """Fail early, naming the setting, when the policy or the gate asks for a metric this task has no value of:
    top-5 accuracy with 5 classes or fewer."""
    settings = {"registry.policy.metric": cfg.policy.metric, "registry.champion_metric": cfg.champion_metric}
    for key, metric in settings.items():
        if metric.endswith("_top5") and num_classes < TOP5_MIN_CLASSES:
            raise ValueError(
                f"{key}: {metric} is not measured for a target task of {num_classes} classes "
                f"(top-5 needs at least {TOP5_MIN_CLASSES}); use {metric.replace('top5', 'top1')}"
            )


def violations(c: Candidate, policy: PolicyConfig, teacher: dict[str, float]) -> list[str]:
    """Every policy constraint `c` breaks, as readable reasons (empty when it qualifies)."""
    m, out = c.metrics, []
    if policy.min_compression is not None:
        ratio = teacher["params"] / m["params"]
        if ratio < policy.min_compression:
            out.append(f"compression {ratio:.2f}x < {policy.min_compression}x")
    if policy.max_params is not None and m["params"] > policy.max_params:
        out.append(f"params {int(m['params'])} > {policy.max_params}")
    if policy.max_latency_ms is not None and m["latency_ms_b1"] > policy.max_latency_ms:
        out.append(f"latency {m['latency_ms_b1']:.3f} ms > {policy.max_latency_ms} ms")
    if policy.min_teacher_retention is not None:
        retention = m["val_top1"] / teacher["val_top1"] if teacher["val_top1"] > 0 else math.inf
        if retention < policy.min_teacher_retention:
            out.append(f"teacher retention {retention:.3f} < {policy.min_teacher_retention}")
    return out


def select(
    candidates: list[Candidate], policy: PolicyConfig, teacher: dict[str, float], val_images: int | None = None
) -> Selection:
    """The policy's pick on validation metrics, why each candidate failing a constraint was dropped, and why the
    pick beat the runner-up (`val_images`: the validation split's size, to state margins in images)."""
    rejected, ok = {}, []
    for c in candidates:
        why = violations(c, policy, teacher)
        if why:
            rejected[c.name] = "; ".join(why)
        else:
            ok.append(c)
    sign = 1 if policy.metric == "val_loss" else -1  # loss: lower is better; accuracies: higher
    ok.sort(
        key=lambda c: (sign * c.metrics[policy.metric], c.metrics.get("val_loss", 0.0), c.metrics["params"], c.name)
    )
    return Selection(ok[0] if ok else None, rejected, explain(ok, policy.metric, val_images))


def explain(ranked: list[Candidate], metric: str, val_images: int | None = None) -> str:
    """Why the first of `ranked` (sorted as `select` sorts) was chosen: its margin over the runner-up, or, when
    they tie on `metric`, which tie-break decided (val loss, then params, then name)."""
    if not ranked:
        return ""
    best = ranked[0]
    if len(ranked) == 1:
        return f"{best.name} is the only candidate that satisfies the policy"
    runner = ranked[1]
    b, r = best.metrics[metric], runner.metrics[metric]
    accuracy = metric != "val_loss"
    shown = (lambda v: f"{v:.2%}") if accuracy else (lambda v: f"{v:.4f}")
    on = f" on {val_images} images" if val_images else ""
    if b != r:
        margin = f"{abs(b - r):.2%}" if accuracy else f"{abs(b - r):.4f}"
        if accuracy and val_images:
            margin += f", {round(abs(b - r) * val_images)} of {val_images} validation images"
        return f"{best.name} leads {runner.name} on {metric}: {shown(b)} vs {shown(r)} ({margin})"
    tied = [c.name for c in ranked if c.metrics[metric] == b]
    if best.metrics.get("val_loss", 0.0) != runner.metrics.get("val_loss", 0.0):
        how = f"lower val loss ({best.metrics['val_loss']:.4f} vs {runner.metrics['val_loss']:.4f})"
    elif best.metrics["params"] != runner.metrics["params"]:
        how = f"fewer params ({int(best.metrics['params']):,} vs {int(runner.metrics['params']):,})"
    else:
        how = "name"
    return f"tied at {shown(b)} {metric}{on} ({', '.join(tied)}); chose {best.name} by {how}"


def beats(new: float, current: float | None, min_improvement: float) -> bool:
    """Strictly better than the current champion by more than `min_improvement`; no champion → True."""
    return current is None or new > current + min_improvement


@dataclass
class Decision:
    selected: str | None
    promoted: bool
    reason: str
    versions: dict[str, int]  # candidate name → registered version
    champion_version: int | None  # after the decision
    previous_champion: int | None
    previous_score: float | None
    rejected: dict[str, str]
    teacher_version: int | None = None
    selection_reason: str = ""  # why the selected candidate and not the runner-up


def _metric_tags(metrics: dict[str, float]) -> dict[str, str]:
    """Metrics as version tags, written exactly (repr) so a stored score compares equal to a recomputed one."""
    return {k: repr(float(v)) for k, v in metrics.items()}


def current_champion(client, cfg: RegistryConfig):
    """The model version holding the alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(cfg.model_name, cfg.alias)
    except MlflowException as err:
        if err.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def gate_reason(
    cfg: RegistryConfig, best: Candidate | None, promoted: bool, prev_version: int | None, previous: float | None
) -> str:
    """The champion gate's decision in words."""
    if best is None:
        return "no candidate satisfies the policy"
    score = best.metrics[cfg.champion_metric]
    if prev_version is None:
        return f"{best.name} is the first champion ({cfg.champion_metric}={score:.4f})"
    if promoted:
        return f"{best.name} {cfg.champion_metric}={score:.4f} beats champion v{prev_version} ({previous:.4f})"
    return (
        f"{best.name} {cfg.champion_metric}={score:.4f} does not beat champion v{prev_version} "
        f"({previous:.4f} + {cfg.min_improvement})"
    )


def significance_reason(cfg: RegistryConfig, best: Candidate, promoted: bool, prev_version: int, g: Gain) -> str:
    """The significance gate's decision in words: the paired difference, its interval and McNemar's p."""
    verdict = "beats" if promoted else "is not significantly better than"
    return (
        f"{best.name} {verdict} champion v{prev_version}: test top-1 {g.format()} points on {g.n} paired images, "
        f"McNemar p={g.p_value:.3g} (level {cfg.significance_level})"
    )


def _against_champion(cfg: RegistryConfig, champ, best: Candidate | None, test_hash: str, rescore, paired):
    """The current champion's score on this run's test split (stored when scored on the same split, else
    rescored), and for the significance gate the pick's paired gain over it. (None, None) without a champion."""
    if champ is None:
        return None, None
    stored = champ.tags.get(cfg.champion_metric)
    uri = f"models:/{cfg.model_name}/{champ.version}"
    score = float(stored) if champ.tags.get(TEST_HASH_TAG) == test_hash and stored is not None else rescore(uri)
    if cfg.gate != "significance" or best is None:
        return score, None
    if paired is None:
        raise ValueError("registry.gate=significance needs the candidates' per-image test results")
    return score, paired(best.name, uri)


def register_and_promote(
    client,
    cfg: RegistryConfig,
    candidates: list[Candidate],
    teacher: dict[str, float],
    test_hash: str,
    rescore: Callable[[str], float],
    teacher_uri: str | None = None,
    val_images: int | None = None,
    paired: Callable[[str, str], Gain] | None = None,
) -> Decision:
    """Register the teacher (as `cfg.teacher_model_name`, when `teacher_uri` is given) and every candidate (as
    versions of `cfg.model_name`), then move the alias per policy and gate.

    `rescore(model_uri)` evaluates a registered model on this run's test data; it is used only when the current
    champion was scored on different test data (its stored score would not be comparable). With
    `cfg.gate == "significance"`, `paired(candidate name, champion model URI)` gives the candidate's paired gain
    over the champion on this run's test images. Both run before anything is written, so a champion that cannot
    be compared leaves the registry untouched.
    """
    import mlflow

    lacking = [c.name for c in candidates if not {cfg.policy.metric, cfg.champion_metric} <= c.metrics.keys()]
    if lacking:  # checked before anything is registered: no half-written decision
        raise ValueError(
            f"candidates {lacking} have no {cfg.policy.metric!r} or {cfg.champion_metric!r} metric "
            "(registry.policy.metric / registry.champion_metric)"
        )
    selection = select(candidates, cfg.policy, teacher, val_images)
    champ = current_champion(client, cfg)
    previous_score, versus = _against_champion(cfg, champ, selection.best, test_hash, rescore, paired)

    lineage: dict[str, str] = {}
    teacher_version = None
    if teacher_uri is not None:
        teacher_tags = {TEST_HASH_TAG: test_hash, **_metric_tags(teacher)}
        teacher_version = int(mlflow.register_model(teacher_uri, cfg.teacher_model_name, tags=teacher_tags).version)
        lineage = {"kdflow.teacher_model": cfg.teacher_model_name, "kdflow.teacher_version": str(teacher_version)}
    versions: dict[str, int] = {}
    for c in candidates:  # one call per version: each version appears whole (files, run link, tags) or not at all
        tags = {**c.tags, **lineage, TEST_HASH_TAG: test_hash, **_metric_tags(c.metrics)}
        mv = mlflow.register_model(c.model_uri, cfg.model_name, tags=tags)
        versions[c.name] = int(mv.version)

    prev_version = int(champ.version) if champ is not None else None
    best = selection.best
    if versus is not None:
        promoted = versus.diff > 0 and versus.significant(cfg.significance_level)
        reason = significance_reason(cfg, best, promoted, prev_version, versus)
    else:
        promoted = best is not None and beats(best.metrics[cfg.champion_metric], previous_score, cfg.min_improvement)
        reason = gate_reason(cfg, best, promoted, prev_version, previous_score)
    if promoted:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, versions[best.name])
    return Decision(
        selected=best.name if best else None,
        promoted=promoted,
        reason=reason,
        versions=versions,
        champion_version=versions[best.name] if promoted else prev_version,
        previous_champion=prev_version,
        previous_score=previous_score,
        rejected=selection.rejected,
        teacher_version=teacher_version,
        selection_reason=selection.why,
    )
