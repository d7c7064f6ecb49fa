"""Which candidate ships: the selection policy on validation data and the champion gate on test data.

Policy (stated, configurable): among candidates that satisfy every constraint — compression ≥
`min_compression` (teacher params / student params), params ≤ `max_params`, batch-1 CPU latency ≤
`max_latency_ms`, val accuracy ≥ `min_teacher_retention` × the teacher's, measured speed-up over the teacher ≥
`min_speedup` — pick the best `metric` on the
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
from kdflow.tracking import current_user

TEST_HASH_TAG = "kdflow.test_data_hash"
ONNX_URI_TAG = "kdflow.onnx_model_uri"  # on a version: its ONNX model (`models:/<id>`), for `mlflow models serve`
QUANTIZED_FROM_TAG = "kdflow.quantized_from"  # on an INT8 candidate: the FP32 candidate it was quantized from
FP32_VERSION_TAG = "kdflow.fp32_version"  # on an INT8 version: the version of that FP32 candidate
CALIBRATION_HASH_TAG = "kdflow.calibration_hash"  # on an INT8 candidate: SHA-256 of its calibration images


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
    if policy.min_speedup is not None and m.get("speedup", 0.0) < policy.min_speedup:
        out.append(f"measured speed-up {m.get('speedup', 0.0):.2f}x < {policy.min_speedup}x")
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


# the metrics a model version carries as tags (besides the gate's and the policy's own; val_loss is the policy's
# tie-break): what `kdflow models` shows; every other metric stays on the version's run
HEADLINE_METRICS = (
    "val_top1", "val_loss", "test_top1", "test_top5", "params", "macs", "latency_ms_b1", "teacher_agreement",
    "compression", "gain_vs_ce_test_top1",
)  # fmt: skip


def _metric_tags(metrics: dict[str, float], cfg: RegistryConfig) -> dict[str, str]:
    """The headline metrics (and the gate's and policy's metrics of `cfg`) as version tags, written exactly
    (repr) so a stored score compares equal to a recomputed one."""
    keep = set(HEADLINE_METRICS) | {cfg.champion_metric, cfg.policy.metric}
    return {k: repr(float(v)) for k, v in metrics.items() if k in keep}


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


POLL_S = (0.05, 0.25)  # jittered pause between reads of the alias
MOVE_TAG = "kdflow.alias_move"  # registered-model tag prefix of the alias's history: one tag per move


def settle_alias(
    client,
    cfg: RegistryConfig,
    choose: Callable[[int | None], int | None],
    reason: str,
    run_id: str = "",
    poll_s: tuple[float, float] = POLL_S,
    max_writes: int = 50,
) -> int | None:
    """Keep `cfg.alias` on `choose(holder)`, the version it should hold given its holder, until the alias has
    stayed put for `cfg.settle_seconds` after this step's last write; return the version holding it then.

    MLflow has no compare-and-swap on aliases, so two pipelines that read the champion and then write the alias
    can lose each other's update: the lower of two new picks written last, by a step starved between its read
    and its write. So the choice (which may rescore a model) comes first, then the alias is read again and
    written only if the same version still holds it, which shrinks the read-to-write gap to two requests; every
    step keeps re-reading after it writes; and `choose` (`register_and_promote`) weighs not only this step's
    pick but every version that held the alias since this step started (its move history), so the step that
    wrote last puts back a better pick that a stale write displaced, whoever's it is, even once that pick's own
    step has stopped watching. Two first writes at once hit the store's unique key: the loser reads again.
    After `max_writes` writes the alias is contested (pipelines that each score the other higher, e.g. on
    different test splits): an error. Only the REST API is used. Each move is recorded (`record_move`)."""
    import random
    import time

    from mlflow.exceptions import MlflowException

    def holder_now() -> int | None:
        champ = current_champion(client, cfg)
        return int(champ.version) if champ is not None else None

    rng = random.Random()
    last_write, writes, collisions = time.monotonic(), 0, 0
    while True:
        holder = holder_now()
        target = choose(holder)
        if target is not None and target != holder:
            if holder_now() != holder:  # moved while choosing: choose again
                last_write = time.monotonic()  # (and watch on: someone is writing)
                time.sleep(rng.uniform(*poll_s))
                continue
            if writes >= max_writes:
                raise RuntimeError(
                    f"alias {cfg.alias!r} of {cfg.model_name!r} is contested: written {writes} times by this step "
                    "and taken back each time (concurrent pipelines scoring each other higher?)"
                )
            try:
                client.set_registered_model_alias(cfg.model_name, cfg.alias, target)
            except MlflowException as err:  # two first writes at once: the store's unique key refuses one
                collisions += 1
                if collisions > 20 or "UNIQUE" not in str(err).upper() and "DUPLICATE" not in str(err).upper():
                    raise
                time.sleep(rng.uniform(*poll_s))
                continue  # read again: the other write landed
            writes += 1
            record_move(client, cfg, holder, target, run_id, reason)
            last_write = time.monotonic()
        elif time.monotonic() - last_write >= cfg.settle_seconds:
            return holder
        time.sleep(rng.uniform(*poll_s))


def record_move(
    client, cfg: RegistryConfig, previous: int | None, version: int, run_id: str, reason: str, action: str = ""
) -> None:
    """One registered-model tag per alias move, `kdflow.alias_move.<alias>.<ns>.<version>`: the previous and new
    version, the run, the reason, who and the time, so a rollback target is always known (tags of distinct keys
    never overwrite each other, unlike one history tag appended to by concurrent pipelines). `action`: set by
    the registry commands (`promote`, `rollback`); a pipeline's moves have none."""
    import json
    import time
    from datetime import datetime, timezone

    move = {
        "alias": cfg.alias,
        "previous_version": previous,
        "version": version,
        "run_id": run_id,
        "reason": reason[:4000],
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "user": current_user(),
    }
    if action:
        move["action"] = action
    key = f"{MOVE_TAG}.{cfg.alias}.{time.time_ns()}.{version}"
    client.set_registered_model_tag(cfg.model_name, key, json.dumps(move))


def alias_history(client, cfg: RegistryConfig) -> list[dict]:
    """The recorded moves of `cfg.alias`, oldest first."""
    return moves_in(client.get_registered_model(cfg.model_name).tags, cfg.alias)


def moves_in(tags: dict[str, str], alias: str) -> list[dict]:
    """The moves of `alias` recorded in a registered model's `tags` (`record_move`), oldest first."""
    import json

    prefix = f"{MOVE_TAG}.{alias}."
    moves = [
        {**json.loads(v), "ns": int(k[len(prefix) :].split(".")[0])} for k, v in tags.items() if k.startswith(prefix)
    ]
    return sorted(moves, key=lambda m: m["ns"])


def _gate(cfg: RegistryConfig, best: Candidate, score: float | None, versus: Gain | None) -> bool:
    """The gate's verdict on `best` against a champion scoring `score` on this run's test split (under the
    significance gate, `versus`: the pick's paired gain over it)."""
    if versus is not None:
        return versus.diff > 0 and versus.significant(cfg.significance_level)
    return beats(best.metrics[cfg.champion_metric], score, cfg.min_improvement)


def _chooser(client, cfg, best, mine, test_hash, rescore, paired, started_ns, first):
    """`choose(holder)` for `settle_alias`: the best version that held the alias since this step began (the
    holder among them; ties keep the holder), or this step's pick `mine` when it beats that one under the gate.
    `first` = (version, score, verdict) of the champion the step started from, already judged. Versions are
    read once; a rival's score is cheap (stored, or rescored once), the gate's verdict is taken for the front
    rival only (under the significance gate it pairs predictions)."""
    from mlflow.exceptions import MlflowException

    fetched: dict[int, object] = {}
    scores, verdicts = ({first[0]: first[1]}, {first[0]: first[2]}) if first else ({}, {})

    def version(v: int):
        if v not in fetched:
            fetched[v] = client.get_model_version(cfg.model_name, str(v))
        return fetched[v]

    def score(v: int) -> float:
        if v not in scores:
            scores[v] = _against_champion(cfg, version(v), None, test_hash, rescore, paired)[0]
        return scores[v]

    def beaten(v: int) -> bool:
        if v not in verdicts:
            verdicts[v] = _gate(cfg, best, *_against_champion(cfg, version(v), best, test_hash, rescore, paired))
        return verdicts[v]

    def choose(holder: int | None) -> int | None:
        held = {m["version"] for m in alias_history(client, cfg) if m["ns"] >= started_ns}
        rivals = []
        for v in sorted({v for v in held | {holder} if v is not None and v != mine}):
            try:
                rivals.append((score(v), v == holder, v))
            except MlflowException:  # deleted meanwhile (a failed step's undo): no rival
                continue
        front = max(rivals)[2] if rivals else None
        return mine if front is None or beaten(front) else front

    return choose


def _register(
    client, cfg, candidates, teacher, test_hash, rescore, teacher_uri, teacher_tags, paired, selection, champ,
    previous_score, versus, partial: Decision, started_ns: int = 0,
):  # fmt: skip
    """Register the teacher and the candidates (recording each version in `partial` as it appears), then settle
    the alias; returns (teacher version, promoted, reason, the alias's final holder)."""
    import mlflow

    lineage: dict[str, str] = {}
    teacher_version = None
    if teacher_uri is not None:
        tags = {**teacher_tags, TEST_HASH_TAG: test_hash, **_metric_tags(teacher, cfg)}
        teacher_version = int(mlflow.register_model(teacher_uri, cfg.teacher_model_name, tags=tags).version)
        partial.teacher_version = teacher_version
        lineage = {"kdflow.teacher_model": cfg.teacher_model_name, "kdflow.teacher_version": str(teacher_version)}
    versions = partial.versions
    for c in candidates:  # one call per version: each version appears whole (files, run link, tags) or not at all
        tags = {**c.tags, **lineage, TEST_HASH_TAG: test_hash, **_metric_tags(c.metrics, cfg)}
        if c.tags.get(QUANTIZED_FROM_TAG) in versions:  # an INT8 model: the FP32 version it came from (listed first)
            tags[FP32_VERSION_TAG] = str(versions[c.tags[QUANTIZED_FROM_TAG]])
        mv = mlflow.register_model(c.model_uri, cfg.model_name, tags=tags)
        versions[c.name] = int(mv.version)

    prev_version = int(champ.version) if champ is not None else None
    best = selection.best
    promoted = best is not None and _gate(cfg, best, previous_score, versus)
    if versus is not None:
        reason = significance_reason(cfg, best, promoted, prev_version, versus)
    else:
        reason = gate_reason(cfg, best, promoted, prev_version, previous_score)
    final = prev_version
    if best is not None:  # concurrent pipelines may move the alias meanwhile: settle it (`settle_alias`)
        mine = versions[best.name]
        move = f"{best.name} ({cfg.champion_metric}={best.metrics[cfg.champion_metric]:.4f}) beats the holder"
        first = (prev_version, previous_score, promoted) if prev_version is not None else None
        choose = _chooser(client, cfg, best, mine, test_hash, rescore, paired, started_ns, first)
        final = settle_alias(client, cfg, choose, move, best.run_id)
        if final == mine and not promoted:
            reason += "; meanwhile a concurrent pipeline moved the alias to a version this pick beats, so it holds it"
        elif final != mine and promoted:
            reason += f"; then champion v{final} of a concurrent pipeline beat it"
        elif final != mine and final != prev_version:
            reason += f"; the champion is now v{final}, set by a concurrent pipeline"
        promoted = final == mine
    return teacher_version, promoted, reason, final


def undo(client, cfg: RegistryConfig, decision: Decision) -> None:
    """Take back what a register step wrote: the alias back to where this step's own last move took it from
    (when it still holds one of the step's versions and that version still exists; else the alias is
    removed), then the step's versions (the teacher's too) deleted. Each part is tried on its own, so one that
    fails does not keep the versions of a failed run in the registry. For a step that fails after registering."""
    import warnings

    ours = set(decision.versions.values())

    def attempt(what: str, fn) -> None:
        try:
            fn()
        except Exception as err:  # keep going: the caller re-raises the step's own error
            warnings.warn(f"undoing the register step: {what} failed: {err}", stacklevel=3)

    def restore() -> None:
        champ = current_champion(client, cfg)
        if champ is None or int(champ.version) not in ours:
            return  # the alias is not on this step's versions: nothing to take back
        moves = [m for m in alias_history(client, cfg) if m["version"] in ours]
        back = moves[-1]["previous_version"] if moves else decision.previous_champion
        if back is not None and back not in ours:
            try:
                client.get_model_version(cfg.model_name, str(back))
            except Exception:
                back = None  # deleted meanwhile (another step's undo)
        if back is not None:
            client.set_registered_model_alias(cfg.model_name, cfg.alias, back)
        else:
            client.delete_registered_model_alias(cfg.model_name, cfg.alias)
        record_move(client, cfg, int(champ.version), back, "", "undone: the register step failed")

    attempt("restoring the alias", restore)
    for v in sorted(ours):
        attempt(f"deleting version {v}", lambda v=v: client.delete_model_version(cfg.model_name, str(v)))
    if decision.teacher_version is not None:
        attempt(
            "deleting the teacher version",
            lambda: client.delete_model_version(cfg.teacher_model_name, str(decision.teacher_version)),
        )


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
    teacher_tags: dict[str, str] | None = None,
) -> Decision:
    """Register the teacher (as `cfg.teacher_model_name`, when `teacher_uri` is given, with `teacher_tags` beside
    its scores) and every candidate (as versions of `cfg.model_name`), then move the alias per policy and gate.

    `rescore(model_uri)` evaluates a registered model on this run's test data; it is used only when the current
    champion was scored on different test data (its stored score would not be comparable). With
    `cfg.gate == "significance"`, `paired(candidate name, champion model URI)` gives the candidate's paired gain
    over the champion on this run's test images. Both run before anything is written, so a champion that cannot
    be compared leaves the registry untouched.
    """

    lacking = [c.name for c in candidates if not {cfg.policy.metric, cfg.champion_metric} <= c.metrics.keys()]
    if lacking:  # checked before anything is registered: no half-written decision
        raise ValueError(
            f"candidates {lacking} have no {cfg.policy.metric!r} or {cfg.champion_metric!r} metric "
            "(registry.policy.metric / registry.champion_metric)"
        )
    selection = select(candidates, cfg.policy, teacher, val_images)
    champ = current_champion(client, cfg)
    previous_score, versus = _against_champion(cfg, champ, selection.best, test_hash, rescore, paired)

    import time

    started_ns = time.time_ns()  # the alias moves from here on are this step's contest (`settle_alias`)
    versions: dict[str, int] = {}
    partial = Decision(None, False, "", versions, None, int(champ.version) if champ is not None else None, None, {})
    try:  # all or nothing: a failure takes back this step's versions and any alias move it made
        teacher_version, promoted, reason, final = _register(
            client, cfg, candidates, teacher, test_hash, rescore, teacher_uri, teacher_tags or {}, paired, selection,
            champ, previous_score, versus, partial, started_ns,
        )  # fmt: skip
    except BaseException:
        undo(client, cfg, partial)
        raise
    best, prev_version = selection.best, partial.previous_champion
    return Decision(
        selected=best.name if best else None,
        promoted=promoted,
        reason=reason,
        versions=versions,
        champion_version=final,
        previous_champion=prev_version,
        previous_score=previous_score,
        rejected=selection.rejected,
        teacher_version=teacher_version,
        selection_reason=selection.why,
    )
