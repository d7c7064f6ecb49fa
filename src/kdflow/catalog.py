"""What the registry commands do (`kdflow models`, `promote`, `rollback`, `show`), on any MLflow store: the
registered models and their champions, a promotion by hand through the pipeline's gate, a rollback along the
alias's recorded history, and a past pipeline run's summary read back from MLflow.

Nothing here writes before every check has passed: a bad model, version or run name is a `CatalogError` and
leaves the registry as it was."""

from __future__ import annotations

import json
from dataclasses import dataclass

from kdflow import registry, tracking
from kdflow.config import RegistryConfig

DECISION_ARTIFACT = "decision.json"  # ... and on the register run (runs from before the parent copy)
ACTION_PROMOTE, ACTION_ROLLBACK = "promote", "rollback"  # a move's `action` (the pipeline's moves have none)


class CatalogError(ValueError):
    """Bad input to a registry command: an unknown model, version or run, or a move the gate refuses."""


@dataclass
class ModelRow:
    name: str
    champion: int | None
    versions: int
    headline: dict[str, float]  # the champion's headline metrics (its version tags)
    last_move: str  # when the alias last moved, and by whom


def _registered(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        raise CatalogError(f"no registered model {name!r}") from None


def _version(client, name: str, version: int):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise CatalogError(f"model {name!r} has no version {version}") from None


def _versions(client, name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda mv: int(mv.version))


def headline(tags: dict[str, str]) -> dict[str, float]:
    """The headline metrics a version carries as tags (`registry.HEADLINE_METRICS`)."""
    out = {}
    for k in registry.HEADLINE_METRICS:
        try:
            out[k] = float(tags[k])
        except (KeyError, ValueError):
            continue
    return out


def list_models(client, alias: str = "champion") -> list[ModelRow]:
    """Every registered model, with the version holding `alias`, its version count and headline metrics."""
    rows = []
    for rm in sorted(client.search_registered_models(max_results=1000), key=lambda m: m.name):
        aliases = getattr(rm, "aliases", {}) or {}
        champ = int(aliases[alias]) if alias in aliases else None
        moves = registry.moves_in(rm.tags, alias)
        last = moves[-1] if moves else None
        when = f"{last['time'][:19].replace('T', ' ')} by {last.get('user', '?')}" if last else ""
        versions = _versions(client, rm.name)
        metrics = next((headline(mv.tags) for mv in versions if int(mv.version) == champ), {})
        rows.append(ModelRow(rm.name, champ, len(versions), metrics, when))
    return rows


def list_versions(client, name: str) -> list[tuple[int, list[str], dict[str, float], str]]:
    """A model's versions: number, aliases, headline metrics, candidate name."""
    rm = _registered(client, name)
    by_version: dict[int, list[str]] = {}
    for a, v in (getattr(rm, "aliases", {}) or {}).items():
        by_version.setdefault(int(v), []).append(a)
    return [
        (int(mv.version), sorted(by_version.get(int(mv.version), [])), headline(mv.tags),
         mv.tags.get("kdflow.candidate", ""))
        for mv in _versions(client, name)
    ]  # fmt: skip


@dataclass
class Move:
    model: str
    previous: int | None
    version: int
    reason: str


def promote(client, cfg: RegistryConfig, version: int, reason: str = "", force: bool = False) -> Move:
    """Give `version` of `cfg.model_name` the alias through the pipeline's gate (`registry._gate`: its stored
    `champion_metric` must beat the champion's, scored on the same test data, by more than `min_improvement`),
    or unconditionally with `force`; record the move with who, why and the previous champion."""
    _registered(client, cfg.model_name)
    mv = _version(client, cfg.model_name, version)
    champ = registry.current_champion(client, cfg)
    previous = int(champ.version) if champ is not None else None
    if previous == version:
        raise CatalogError(f"{cfg.model_name} v{version} already holds {cfg.alias!r}")
    why = reason or "promoted by hand"
    if force:
        why = f"forced: {why}"
    elif champ is not None:
        why = f"{why}; {_judge(cfg, mv, champ)}"
    client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    registry.record_move(client, cfg, previous, version, "", why, action=ACTION_PROMOTE)
    return Move(cfg.model_name, previous, version, why)


def _judge(cfg: RegistryConfig, mv, champ) -> str:
    """The gate's verdict on version `mv` against the holder `champ`, from their stored scores; a refusal is a
    `CatalogError` (nothing is written)."""
    metric = cfg.champion_metric
    if cfg.gate == "significance":
        raise CatalogError(
            "registry.gate=significance pairs both models' per-image test predictions, which the registry does not "
            "hold: promote with --force, or let a pipeline run decide"
        )
    scores = {}
    for label, v in (("version", mv), ("champion", champ)):
        if metric not in v.tags:
            raise CatalogError(f"{cfg.model_name} v{v.version} has no {metric} tag to compare: promote with --force")
        scores[label] = float(v.tags[metric])
    if mv.tags.get(registry.TEST_HASH_TAG) != champ.tags.get(registry.TEST_HASH_TAG):
        raise CatalogError(
            f"{cfg.model_name} v{mv.version} and champion v{champ.version} were scored on different test data "
            f"({registry.TEST_HASH_TAG} differs): their {metric} do not compare; promote with --force"
        )
    ok = registry.beats(scores["version"], scores["champion"], cfg.min_improvement)
    best = registry.Candidate(f"v{mv.version}", {metric: scores["version"]})
    reason = registry.gate_reason(cfg, best, ok, int(champ.version), scores["champion"])
    if not ok:
        raise CatalogError(f"refused: {reason}; pass --force to promote anyway")
    return reason


def champion_line(moves: list[dict]) -> list[int]:
    """The alias's holders as a stack, replayed from its recorded moves: a move pushes its version, a rollback
    or a failed step's undo goes back to the version it restored (None: the alias was removed)."""
    stack: list[int] = []
    for m in moves:
        v = m["version"]
        restoring = m.get("action") == ACTION_ROLLBACK or str(m.get("reason", "")).startswith("undone")
        if v is None:
            stack.clear()
        elif restoring and v in stack:
            del stack[len(stack) - stack[::-1].index(v) :]  # above the last time it held the alias
        else:
            stack.append(v)
    return stack


def rollback(client, cfg: RegistryConfig, reason: str = "") -> Move:
    """Move the alias back to the champion before the current one, from the recorded history."""
    _registered(client, cfg.model_name)
    champ = registry.current_champion(client, cfg)
    if champ is None:
        raise CatalogError(f"{cfg.model_name} has no {cfg.alias!r}: nothing to roll back")
    holder = int(champ.version)
    line = champion_line(registry.alias_history(client, cfg))
    if not line or line[-1] != holder:
        raise CatalogError(
            f"{cfg.model_name}: {cfg.alias!r} is on v{holder}, but its recorded history ends at "
            f"{'v' + str(line[-1]) if line else 'nothing'} (moved outside kdflow?): use kdflow promote"
        )
    if len(line) < 2:
        raise CatalogError(f"{cfg.model_name} v{holder} is the first recorded {cfg.alias}: no previous one")
    back = line[-2]
    _version(client, cfg.model_name, back)  # deleted since: refuse, nothing moved
    why = f"rollback from v{holder}" + (f": {reason}" if reason else "")
    client.set_registered_model_alias(cfg.model_name, cfg.alias, back)
    registry.record_move(client, cfg, holder, back, "", why, action=ACTION_ROLLBACK)
    return Move(cfg.model_name, holder, back, why)


# ------------------------------------------------------------------------------------------------- show


def pipeline_run(client, run: str | None = None):
    """A pipeline's parent run: by run id or run name, else the latest one in any experiment."""
    from mlflow.exceptions import MlflowException

    pipeline = f"tags.`{tracking.STEP_TAG}` = '{tracking.PIPELINE_STEP}'"
    experiments = [e.experiment_id for e in client.search_experiments()]
    if run is not None:
        try:
            found = client.get_run(run)
            if found.data.tags.get(tracking.STEP_TAG) != tracking.PIPELINE_STEP:
                raise CatalogError(
                    f"run {run} is a {found.data.tags.get(tracking.STEP_TAG)!r} step, not a pipeline run"
                )
            return found
        except MlflowException:
            pass
        safe = run.replace("'", "\\'")
        hits = client.search_runs(experiments, f"{pipeline} and attributes.run_name = '{safe}'", max_results=1,
                                  order_by=["attributes.start_time DESC"])  # fmt: skip
        if not hits:
            raise CatalogError(f"no pipeline run {run!r} (neither a run id nor a pipeline run name)")
        return hits[0]
    hits = client.search_runs(experiments, pipeline, max_results=1, order_by=["attributes.start_time DESC"])
    if not hits:
        raise CatalogError("no pipeline run in this store yet: kdflow run first")
    return hits[0]


def run_summary(client, run) -> dict:
    """The summary (decision, evidence, teacher, candidates) the register step logged for pipeline run `run`."""
    import tempfile

    from mlflow.exceptions import MlflowException

    sources = [(run.info.run_id, tracking.SUMMARY_ARTIFACT)]
    registers = client.search_runs(
        [run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.`{tracking.STEP_TAG}` = 'register'",
        max_results=1,
    )
    sources += [(r.info.run_id, DECISION_ARTIFACT) for r in registers]
    with tempfile.TemporaryDirectory() as tmp:
        for run_id, path in sources:
            try:
                local = client.download_artifacts(run_id, path, tmp)
            except (MlflowException, OSError):
                continue
            with open(local) as f:
                return json.load(f)
    status = run.info.status
    raise CatalogError(f"pipeline run {run.info.run_name} ({run.info.run_id}, {status}) has no summary: it did not "
                       "reach its register step")  # fmt: skip
