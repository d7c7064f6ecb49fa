"""Adaptive distillation: choose a student's distillation settings on validation data, not by hand.

`distill.search` gives each student one more candidate, `<student>-<search.name>`. Its distill step draws
`search.variants` loss settings with Optuna (kind, T, α, λ, β, γ, logit standardization, transfer set) and
always adds plain cross-entropy (α = 0, no teacher), so the chosen variant is never worse than the baseline on
validation. The variants train side by side over one data stream (`fit_many`: one teacher lookup per batch for
all of them; variants whose transfer sets use source images share a second stream) and are halved on validation
at every rung, successive halving (Jamieson & Talwalkar 2016; Li et al., Hyperband, 2018): after `rung_epochs`
epochs only the best 1/`reduction` keep training, again after `reduction` times as many epochs, and so on, until
one is left; it trains on to the end (or its early stop) and is the candidate.

Optuna samples the settings (`TPESampler` or `RandomSampler`, seeded) and keeps the study: each variant a trial
with its settings, its validation accuracy per epoch as intermediate values, pruned at the rung that stopped it
or complete. The halving itself is here and not an Optuna pruner: Optuna's pruners judge one trial at a time
against the trials that reported before it, which suits trials that run one after another, while these
variants train in lockstep and are ranked together at each rung (the order they report in must not matter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kdflow import objectives
from kdflow.config import LABELLED_TRANSFER_KINDS, STANDARDIZABLE_KINDS, LossConfig, SearchConfig

BASELINE = "ce"  # the variant every search has: plain cross-entropy, α = 0
SEARCHING = "search"  # a search candidate's `kdflow.loss` tag until its distill step has chosen


@dataclass
class Variant:
    """One sampled setting: its loss, the Optuna trial that holds it, and how its training went."""

    loss: LossConfig
    trial: object  # optuna.trial.Trial
    halted_at: int | None = None  # the rung (epoch) that stopped it; None for the survivor
    best_val_acc: float = 0.0
    best_key: tuple[float, float] = (0.0, -math.inf)  # (best val accuracy, −its val loss): the ranking key
    curve: list[float] = field(default_factory=list)  # val accuracy per epoch

    def settings(self) -> dict:
        """What distinguishes this variant (the loss fields its kind reads)."""
        return settings(self.loss)


def settings(loss: LossConfig) -> dict:
    """The fields of `loss` its kind reads, for records and tags."""
    used = {
        "ce": (),
        "kd": ("temperature", "alpha", "standardize", "transfer"),
        "logit_mse": ("lam", "transfer"),
        "dkd": ("temperature", "alpha", "beta", "standardize", "transfer"),
        "dist": ("temperature", "beta", "gamma", "transfer"),
        "hint": ("alpha", "beta", "transfer"),
    }[loss.kind]
    return {"kind": loss.kind, **{k: getattr(loss, k) for k in used}}


def _suggest(trial, space: SearchConfig, name: str, has_source: bool) -> LossConfig:
    """Draw one variant's loss from the trial (define-by-run: only the fields its kind uses)."""
    kind = trial.suggest_categorical("kind", [BASELINE, *space.kinds])
    fields: dict = {"name": name, "kind": kind}
    if kind == BASELINE:
        return LossConfig(**fields)
    transfers = [t for t in space.transfer if has_source or t == "target"] or ["target"]
    if kind not in LABELLED_TRANSFER_KINDS and len(transfers) > 1:
        fields["transfer"] = trial.suggest_categorical("transfer", transfers)
    elif kind not in LABELLED_TRANSFER_KINDS:
        fields["transfer"] = transfers[0]
    if kind in ("kd", "dkd", "dist"):
        fields["temperature"] = trial.suggest_float("temperature", *space.temperature, log=True)
    if kind in ("kd", "dkd"):
        fields["alpha"] = trial.suggest_float("alpha", *space.alpha)
    if kind in STANDARDIZABLE_KINDS:
        fields["standardize"] = trial.suggest_categorical("standardize", [False, True])
    if kind == "logit_mse":
        fields["lam"] = trial.suggest_float("lam", *space.lam, log=True)
    if kind in ("dkd", "dist"):
        fields["beta"] = trial.suggest_float("beta", *space.beta, log=True)
    if kind == "dist":
        fields["gamma"] = trial.suggest_float("gamma", *space.gamma, log=True)
    return LossConfig(**fields)


def sample(space: SearchConfig, seed: int, has_source: bool):
    """The study and its variants: plain CE first (enqueued), then distinct draws from the space. A draw that
    repeats an earlier variant's settings (plain CE again, most often) is told FAIL and drawn again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed) if space.sampler == "tpe" else optuna.samplers.RandomSampler(seed)
    study = optuna.create_study(direction="maximize", sampler=sampler, study_name=f"kdflow-search-{space.name}")
    study.enqueue_trial({"kind": BASELINE})
    variants: list[Variant] = []
    seen: set[tuple] = set()
    for _ in range(50 * space.variants):
        if len(variants) == space.variants:
            break
        trial = study.ask()
        loss = _suggest(trial, space, f"{space.name}{len(variants):02d}", has_source)
        key = tuple(sorted(settings(loss).items()))
        if key in seen:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        seen.add(key)
        variants.append(Variant(loss, trial))
    if len(variants) < space.variants:  # a near-degenerate space the config check could not count
        raise ValueError(
            f"search {space.name!r}: drew only {len(variants)} distinct settings of variants={space.variants}; "
            "widen a range or lower distill.search.variants"
        )
    return study, variants


def rungs(space: SearchConfig, epochs: int) -> list[int]:
    """The epochs at which the variants still training are halved: rung_epochs · reduction^k, below `epochs`."""
    out, r = [], space.rung_epochs
    while r < epochs:
        out.append(r)
        r *= space.reduction
    return out


def survivors(ranked: list[int], reduction: int) -> int:
    """How many of `ranked` variants a rung keeps: ceil(n / reduction), at least 1."""
    return max(1, math.ceil(len(ranked) / reduction))


class Halving:
    """`fit_many`'s `halt` hook for one group of variants (one data stream): at each rung, rank the variants
    still training by their best validation so far (accuracy, then lower loss) and stop all but the best
    1/reduction. Ties keep the earlier variant (plain CE is first)."""

    def __init__(self, space: SearchConfig, epochs: int, variants: list[Variant]):
        self.rungs, self.reduction, self.variants = set(rungs(space, epochs)), space.reduction, variants

    def __call__(self, epoch: int, standing: dict[int, tuple[float, float]]) -> set[int]:
        """`standing`: variant index -> its best (val accuracy, −val loss) so far, for those still training."""
        for i, key in standing.items():
            self.variants[i].best_val_acc, self.variants[i].best_key = key[0], key
        if epoch not in self.rungs or len(standing) <= 1:
            return set()
        ranked = sorted(standing, key=lambda i: (standing[i], -i), reverse=True)
        stop = set(ranked[survivors(ranked, self.reduction) :])
        for i in stop:
            self.variants[i].halted_at = epoch
        return stop


def finish(study, variants: list[Variant]) -> Variant:
    """Tell the study how each variant ended (pruned at its rung, or complete with its best val accuracy) and
    return the chosen one: the best best-validation accuracy (then the lower loss) among the variants that were
    never stopped, the earlier on a tie (the variant first in the list is plain CE)."""
    import optuna

    for v in variants:
        for epoch, acc in enumerate(v.curve, start=1):
            v.trial.report(acc, epoch)
        if v.halted_at is not None:
            study.tell(v.trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(v.trial, v.best_val_acc)
    finalists = [v for v in variants if v.halted_at is None]
    return max(finalists, key=lambda v: (v.best_key, -variants.index(v)))


def describe(loss: LossConfig) -> str:
    """`kind=kd, temperature=3.17, alpha=0.712, ...`: the fields its kind reads, reals to 3 significant digits."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings(loss).items())


def lineage(loss: LossConfig) -> dict[str, str]:
    """The lineage tags of a search candidate once `loss` is chosen: what a fixed candidate with that loss has."""
    return {
        "kdflow.loss": loss.kind,
        **objectives.setting_tags(loss),
        "kdflow.search_choice": loss.name,
        "kdflow.search_settings": describe(loss),
    }


def record(variants: list[Variant], chosen: Variant) -> list[dict]:
    """Each variant's settings and course, for `search.json` and the MLflow run."""
    return [
        {
            "variant": v.loss.name,
            "trial": v.trial.number,
            **v.settings(),
            "epochs": len(v.curve),
            "halted_at": v.halted_at,
            "best_val_acc": v.best_val_acc,
            "chosen": v is chosen,
        }
        for v in variants
    ]
