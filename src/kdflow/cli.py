"""The `kdflow` command: run the local mini-pipeline, compile the pipeline for Kubeflow, submit it to a cluster."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdflow import tracking
from kdflow.config import Config, ConfigError, load_config, local_source_problem
from kdflow.errors import DataError
from kdflow.report import macs, status

app = typer.Typer(no_args_is_help=True, help=__doc__)  # with --install-completion / --show-completion
console = Console(width=None if sys.stdout.isatty() else 120)
HELP_WIDTH = 120  # help printed to a pipe or a file; a terminal's help is as wide as the terminal


def _help_width() -> None:
    """Typer draws help with rich at $TERMINAL_WIDTH, else the terminal's width, and rich falls back to 80 columns
    when stdout is not a terminal (`kdflow run --help | less`), cutting the options' help: give pipes 120."""
    from typer import rich_utils

    if rich_utils.MAX_WIDTH is None and not os.environ.get("COLUMNS") and not sys.stdout.isatty():
        rich_utils.MAX_WIDTH = HELP_WIDTH


_help_width()

CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML config; the built-in digits default when omitted.")
SET_OPT = typer.Option(None, "--set", help="Override one config key, e.g. --set distill.train.epochs=5.")


def _overrides(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({problem})") from None
    return out


def _fail(message: object, code: int = 2) -> typer.Exit:
    """Print one error line (credentials in URIs redacted) and return the exit to raise."""
    console.print(f"[red]error:[/red] {escape(tracking.redact(str(message)))}", soft_wrap=True)
    return typer.Exit(code)


def _load(config: Path | None, sets: list[str] | None) -> Config:
    try:
        return load_config(config, _overrides(sets))
    except ConfigError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Path | None = CONFIG_OPT,
    set_: list[str] | None = SET_OPT,
    home: Path | None = typer.Option(
        None,
        help="Folder for the embedded MLflow store and local outputs (default: $KDFLOW_HOME or ./kdflow-home).",
    ),
    tracking_uri: str | None = typer.Option(
        None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded store)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the steps' full logs, not just progress."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the last run on --home that did not finish (interrupted, killed or failed), with its "
        "config: finished steps are reused, an interrupted training step goes on from its last epoch checkpoint.",
    ),
) -> None:
    """Run the whole pipeline locally (kfp.local), log to MLflow and promote a champion. Ctrl-C stops it within
    seconds (exit 130; 143 on SIGTERM); --resume continues it."""
    from kdflow.pipelines.local import PipelineFailed, ResumeError, recorded_config, run_local
    from kdflow.runner.progress import mlflow_logs_to_run_log, setting_up

    home = (home or tracking.kdflow_home()).expanduser().resolve()
    if home.exists() and not home.is_dir():
        raise _fail(f"--home {home}: not a directory")
    if resume and config is None and not set_:  # the interrupted run's own config
        try:
            cfg = recorded_config(home) if home.is_dir() else None
        except ResumeError as err:
            raise _fail(err) from None
        if cfg is None:
            raise _fail(f"--resume: no earlier kdflow run on {home} to continue")
    else:
        cfg = _load(config, set_).with_local_paths(Path.cwd())
    for key in ("source", "target"):  # a missing data folder fails here, in seconds, not in data prep
        if problem := local_source_problem(getattr(cfg.data, key), cfg.data.image_size):
            raise _fail(f"data.{key}: {problem}")
    uri = _store_uri(home, tracking_uri)  # within 10 s, before any training
    n = len(cfg.candidates())
    console.print(
        f"[bold]kdflow[/bold] {cfg.experiment}: {cfg.data.setup} on {cfg.data.source}"
        f"{' → ' + cfg.data.target if cfg.data.target else ''}, {n} candidates; MLflow at {uri}"
    )
    try:
        if not resume:  # bad data fails here, in seconds, not in data prep (a resumed run reuses its data)
            with console.status("checking the data …"):
                from kdflow import data  # torch: imported once the config and store are known good

                data.check(cfg.data, cfg.seed)
        # the store's set-up lines go to the run log, not the console, which shows what happens until the log opens
        with mlflow_logs_to_run_log(), setting_up(console):
            summary = run_local(cfg, home, uri, verbose, resume)
    except DataError as err:
        raise _fail(err) from None
    except ResumeError as err:
        raise _fail(err) from None
    except PipelineFailed as err:
        console.print(f"[red]pipeline failed:[/red] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(1) from None
    _print_summary(summary)
    _print_report(summary)
    if uri.startswith("sqlite:///"):
        console.print(f"Open the runs: [bold]mlflow ui --backend-store-uri {uri}[/bold]")
        console.print(f"  then {UI_LINK} (MLflow's Model training view)", soft_wrap=True, highlight=False)


# MLflow 3.17's UI shows an experiment in its GenAI or its Model training view by this switch (older 3.x UIs read
# the experiment's `mlflow.experimentKind` tag, which kdflow also sets); links keep it while you navigate
UI_LINK = "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"


def _print_report(summary: dict) -> None:
    """Where the run's report is: a local path for the embedded store, else its artifact URI."""
    uri = summary.get("report")
    if not uri:
        return
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        uri = unquote(urlsplit(uri).path)
    console.print(f"report: [bold]{escape(uri)}[/bold]", soft_wrap=True, highlight=False)


def table_width(table: Table) -> int:
    """The width `table` needs with no cell cut (measured on a wide scratch console)."""
    scratch = Console(width=1000, file=io.StringIO())
    return scratch.measure(table).maximum


def _shown_gain(g: dict | None) -> str:
    """`+1.2 [+0.3, +2.1]`, starred when the interval is above 0 and McNemar p < 0.05."""
    if g is None:
        return ""
    return g["shown"] + ("*" if g["p_value"] < 0.05 and g["ci_low"] > 0 else "")


def _evidence_cells(name: str, ev: dict) -> list[str]:
    """The `vs ce` (and, with from-scratch baselines, `vs scratch`) cells of one candidate's row."""
    gains, scratch = ev.get("gains_vs_ce", {}), ev.get("gains_vs_scratch", {})
    vs = _shown_gain(gains.get(name))
    if not vs and any(v["baseline"] == name for v in gains.values()):
        vs = "baseline (pruned init)" if name in scratch else "baseline"
    if not vs and any(v["baseline"] == name for v in scratch.values()):
        vs = "baseline (from scratch)"
    return [vs, _shown_gain(scratch.get(name))] if scratch else [vs]


def _speed_cells(m: dict, cols: tuple[str, ...], teacher: bool = False) -> list[str]:
    """The ONNX Runtime batch-1 latency and `speed-up / MACs` cells (`3.1x / 4.0x`, `!` when flagged)."""
    cells = []
    if "ORT ms @b1" in cols:
        cells.append(f"{m['ort_latency_ms_b1']:.3f}" if "ort_latency_ms_b1" in m else "")
    if "speed-up / MACs" in cols:
        shown = "" if teacher or "speedup" not in m else f"{m['speedup']:.1f}x / {m['mac_ratio']:.1f}x"
        cells.append(shown + (" !" if m.get("speedup_flagged") else ""))
    return cells


def _print_summary(summary: dict) -> None:
    """The run's final table: the teacher and every candidate, their evidence against `ce`, and the decision."""
    d, ev = summary["decision"], summary.get("evidence", {})
    gains = ev.get("gains_vs_ce", {})
    table = Table(title=f"{summary['model_name']}: teacher and candidates (top-1 on val and test)")
    evidence_cols = ["vs ce, 95% CI"] + (["vs scratch"] if ev.get("gains_vs_scratch") else [])
    seeds = max((int(c.get("seeds", 1)) for c in summary["candidates"].values()), default=1)
    fast = summary.get("speedup")  # ONNX Runtime latency and the measured speed-up (`kdflow.deploy`)
    speed_cols = ("ORT ms @b1", "speed-up / MACs") if fast and fast["runtime"] == "onnxruntime" else ()
    speed_cols = speed_cols or (("speed-up / MACs",) if fast else ())
    cols = ("model", "val", "test", *evidence_cols, "params", "MACs", "ms @b1", *speed_cols)
    if seeds > 1:  # val: the seeds' mean (what selection used); test: mean ± std over seeds
        cols = ("model", f"val (mean of {seeds})", f"test (mean ± sd of {seeds})", *cols[3:])
    for col in (*cols, "agrees", "ver", "status"):
        # every cell but the status reads whole: names, numbers and intervals are never cut
        table.add_column(col, justify="left" if col in ("model", "status") else "right", no_wrap=col != "status")
    t = summary["teacher"]
    teacher_status = "[yellow]weak teacher[/yellow]" if ev.get("weak_teacher") else ""
    table.add_row(
        "teacher", f"{t['val_top1']:.2%}", f"{t['test_top1']:.2%}", *[""] * len(evidence_cols),
        f"{int(t['params']):,}", macs(t["macs"]), f"{t['latency_ms_b1']:.3f}",
        *_speed_cells(t, speed_cols, teacher=True), "", f"v{t['version']}", teacher_status,
    )  # fmt: skip
    for name, c in sorted(summary["candidates"].items(), key=lambda kv: -kv[1]["val_top1"]):
        mark = status(name, c, d)
        test = f"{c['test_top1']:.2%}"
        if "test_top1_std" in c:
            test = f"{c['test_top1_mean']:.2%} ± {100 * c['test_top1_std']:.1f}"
        table.add_row(
            name, f"{c['val_top1']:.2%}", test, *_evidence_cells(name, ev),
            f"{int(c['params']):,}", macs(c["macs"]), f"{c['latency_ms_b1']:.3f}", *_speed_cells(c, speed_cols),
            f"{c['teacher_agreement']:.2%}", f"v{c['version']}", mark,
        )  # fmt: skip
    _print_table(table)
    if gains:
        console.print(
            "vs ce: test top-1 points over the same student trained with plain cross-entropy in this run, "
            "paired bootstrap 95% interval; * = interval above 0 and McNemar p < 0.05"
        )
        if not any(g["ci_low"] > 0 and g["p_value"] < 0.05 for g in gains.values()):
            console.print("[yellow]no distilled candidate beat its ce baseline beyond noise in this run[/yellow]")
        if seeds > 1:
            console.print(
                f"over {seeds} training seeds: the intervals cover the seed spread and the test images; the "
                "registered model is the first seed's, and its own test top-1 is what the champion gate compares"
            )
    if fast:
        console.print(
            f"speed-up: the teacher's latency over the model's, measured in {fast['runtime']} at batch "
            f"{fast['batch']} with {fast['threads']} thread(s), next to the MAC ratio; ! = below "
            f"{fast['min_share']:.0%} of the MAC ratio (evaluate.min_speedup_share); ms @b1 is PyTorch eager "
            "(ONNX Runtime for -int8 models)"
        )
    for name, c in summary["candidates"].items():
        if c.get("search_choice"):
            console.print(f"{escape(name)}: the search chose {escape(c['search_choice'])}", soft_wrap=True)
    if ev.get("weak_teacher"):
        console.print(f"[yellow]{escape(ev['weak_teacher_reason'])}[/yellow]", soft_wrap=True)
    if d.get("selection_reason"):
        console.print(f"selected: {escape(d['selection_reason'])}", soft_wrap=True)
    verdict = "[green]promoted[/green]" if d["promoted"] else "[yellow]champion unchanged[/yellow]"
    console.print(f"{verdict}: {d['reason']}")


@app.command("compile")
def compile_(
    config: Path | None = CONFIG_OPT,
    set_: list[str] | None = SET_OPT,
    output: Path = typer.Option(Path("kdflow-pipeline.yaml"), "--output", "-o", help="Where to write the IR YAML."),
    tracking_uri: str = typer.Option("", help="Default MLflow tracking URI baked into the run parameters."),
) -> None:
    """Compile the pipeline to KFP IR YAML (the config's values become the run parameters' defaults)."""
    from kdflow.pipelines.compile import compile_pipeline

    cfg = _load(config, set_)
    try:
        path = compile_pipeline(cfg, output, tracking_uri)
    except ConfigError as err:
        raise _fail(err) from None
    console.print(f"wrote {path} ({len(cfg.candidates())} candidates)")


config_app = typer.Typer(no_args_is_help=True, help="The run configuration: the resolved config, the keys' reference.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(config: Path | None = CONFIG_OPT, set_: list[str] | None = SET_OPT) -> None:
    """Print the resolved config as YAML: the file (or the built-in default) with the --set overrides and every
    default filled in. `kdflow run -c` on the output runs the same config."""
    from kdflow.config import config_yaml

    origin = str(config) if config is not None else "the built-in default"
    origin += "".join(f" --set {s}" for s in set_ or [])
    sys.stdout.write(config_yaml(_load(config, set_), origin))


@config_app.command("reference")
def config_reference(
    output: Path | None = typer.Option(None, "--output", "-o", help="Write it here (e.g. docs/config.md)."),
) -> None:
    """Print the reference of every config key (type, default, description) generated from the schema."""
    from kdflow.configdoc import reference_markdown

    text = reference_markdown()
    if output is None:
        sys.stdout.write(text)
        return
    output.write_text(text)
    console.print(f"wrote {output}")


PACKAGE_OPT = typer.Option(
    None, "--package", help="Submit this compiled YAML (from `kdflow compile`) instead of compiling the config."
)
HOST_OPT = typer.Option(
    None,
    "--host",
    envvar="KF_PIPELINES_ENDPOINT",
    help="KFP API URL, e.g. http://localhost:8080 (port-forwarded ml-pipeline-ui) or https://<kubeflow>/pipeline.",
)
NAMESPACE_OPT = typer.Option(None, "--namespace", "-n", help="Profile namespace (multi-user Kubeflow).")
EXPERIMENT_OPT = typer.Option(None, help="KFP experiment, created when missing (default: the config's experiment).")
RUN_NAME_OPT = typer.Option(None, help="Run name (default: <experiment>-<UTC timestamp>).")
PARAM_OPT = typer.Option(
    None, "--param", help="Run parameter k=v: tracking_uri, candidates (a YAML list of names) or config_json."
)
TOKEN_OPT = typer.Option(
    None,
    help="Bearer token (default: $KF_PIPELINES_TOKEN, else the service-account token at "
    "$KF_PIPELINES_SA_TOKEN_PATH or /var/run/secrets/kubeflow/pipelines/token).",
)
WAIT_OPT = typer.Option(False, "--wait", help="Follow the run to its end; exit 1 unless it succeeded.")
TIMEOUT_OPT = typer.Option(86400.0, min=0, help="With --wait: give up after this many seconds.")
POLL_OPT = typer.Option(
    15.0, min=0.01, help="With --wait: seconds between status checks (not 0: that would hammer the API)."
)
SCHEDULE_OPT = typer.Option(
    None,
    help="Create a recurring run instead, on this cron (UTC): 6 fields with seconds first as KFP expects, "
    "e.g. '0 0 3 * * 0' (Sundays 03:00); 5 standard fields get seconds=0 prepended; @daily, @every 24h.",
)


@app.command()
def submit(
    config: Path | None = CONFIG_OPT,
    set_: list[str] | None = SET_OPT,
    package: Path | None = PACKAGE_OPT,
    host: str | None = HOST_OPT,
    namespace: str | None = NAMESPACE_OPT,
    experiment: str | None = EXPERIMENT_OPT,
    run_name: str | None = RUN_NAME_OPT,
    param: list[str] | None = PARAM_OPT,
    token: str | None = TOKEN_OPT,
    wait: bool = WAIT_OPT,
    timeout: float = TIMEOUT_OPT,
    poll_interval: float = POLL_OPT,
    schedule: str | None = SCHEDULE_OPT,
) -> None:
    """Submit the pipeline to Kubeflow Pipelines: one run, or with --schedule a recurring run."""
    import tempfile

    from kdflow import submit as kfp
    from kdflow.pipelines.compile import compile_pipeline

    if package is not None and (config is not None or set_):
        raise _fail("--package is already compiled: pass either --package or --config/--set", 2)
    if wait and schedule is not None:
        raise _fail("--wait follows one run, --schedule creates a recurring run: pass one of them", 2)
    if not host:
        raise _fail("no KFP API given: pass --host URL or set $KF_PIPELINES_ENDPOINT", 2)
    try:  # the checks that need no package first
        host, params, auth = kfp.check_host(host), kfp.parse_params(param), kfp.resolve_auth(token)
        if schedule is not None:
            kfp.kfp_cron(schedule)
    except kfp.SubmitError as err:
        raise _fail(err, 2) from None
    with tempfile.TemporaryDirectory(prefix="kdflow-submit-") as tmp:
        if package is None:
            try:
                package = compile_pipeline(_load(config, set_), Path(tmp) / "kdflow-pipeline.yaml")
            except ConfigError as err:
                raise _fail(err) from None
        try:
            plan = kfp.plan(package, params, experiment, run_name, schedule)
            console.print(f"KFP API {host} (auth: {escape(auth.source)})", soft_wrap=True)
            client, namespace = kfp.open_client(host, auth, namespace)
            sub = kfp.submit(client, host, plan, namespace)
        except kfp.SubmitError as err:
            raise _fail(err, 2) from None
        except kfp.KfpError as err:
            raise _fail(err, 1) from None
    _print_submission(sub)
    if wait and not sub.recurring:
        _follow(client, host, sub.id, timeout, poll_interval)


def _print_submission(sub) -> None:
    made = "created" if sub.experiment_created else "existing"
    console.print(f"experiment {escape(sub.experiment)} ({made}, id {sub.experiment_id})", soft_wrap=True)
    if sub.recurring:
        console.print(f"recurring run {escape(sub.name)} on cron {sub.cron!r} (UTC)", soft_wrap=True)
        console.print(f"recurring run id: {sub.id}\nurl: {sub.url}", soft_wrap=True, highlight=False)
        return
    console.print(f"run {escape(sub.name)}", soft_wrap=True)
    console.print(f"run id: {sub.id}\nurl: {sub.url}", soft_wrap=True, highlight=False)


def _follow(client, host: str, run_id: str, timeout: float, poll_interval: float) -> None:
    """--wait: print each state change; exit 1 unless the run succeeds."""
    from kdflow import submit as kfp

    try:
        run = kfp.wait_for_run(
            client,
            host,
            run_id,
            timeout=timeout,
            poll_interval=poll_interval,
            on_state=lambda state: console.print(f"  state: {state}"),
        )
    except kfp.KfpError as err:
        raise _fail(err, 1) from None
    if run.state != kfp.SUCCEEDED:
        why = kfp.run_error(run)
        console.print(f"[red]run {run.state}[/red]{': ' + escape(why) if why else ''}", soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]run {run.state}[/green]")


# ------------------------------------------------------------------------------------- registry commands

HOME_OPT = typer.Option(None, help="Folder of the embedded MLflow store (default: $KDFLOW_HOME or ./kdflow-home).")
URI_OPT = typer.Option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded store).")
REASON_OPT = typer.Option("", "--reason", help="Why: recorded with the move.")


def _client(home: Path | None, tracking_uri: str | None):
    """An MLflow client of the store the registry commands read: --tracking-uri, $MLFLOW_TRACKING_URI, else the
    embedded store in --home (which must exist: these commands never create a store)."""
    import mlflow

    home = (home or tracking.kdflow_home()).expanduser().resolve()
    uri = _store_uri(home, tracking_uri, must_exist=True)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient()


def _store_uri(home: Path, tracking_uri: str | None, must_exist: bool = False) -> str:
    """The MLflow store's URI (--tracking-uri, $MLFLOW_TRACKING_URI, else the embedded store in `home`) without
    its credentials, which travel by environment (MLflow's basic-auth variables), never on a command line; the
    store checked reachable within 10 s (and, with `must_exist`, an embedded one already there)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.embedded_tracking_uri(home)
    uri, user, password = tracking.split_credentials(uri)
    for var, value in zip(tracking.CREDENTIAL_ENV, (user, password)):
        if value is not None:
            os.environ[var] = value
    if must_exist and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise _fail(
            f"no MLflow store at {uri[len('sqlite:///') :]}: run kdflow run first, or pass --home/--tracking-uri"
        )
    try:
        tracking.check_reachable(uri)
    except ConnectionError as err:
        raise _fail(str(err)) from None
    return uri


def _registry_cfg(model: str, config: Path | None, sets: list[str] | None):
    """The registry settings (alias, gate, champion metric) of the config, for `model`."""
    cfg = _load(config, sets).registry
    return cfg.model_copy(update={"model_name": model})


def _shown(metrics: dict[str, float], key: str) -> str:
    if key not in metrics:
        return ""
    v = metrics[key]
    if key == "params":
        return f"{int(v):,}"
    if key == "macs":
        return macs(v)
    return f"{v:.3f}" if key.startswith("latency") else f"{v:.2%}"


HEADLINE_COLS = (("val_top1", "val"), ("test_top1", "test"), ("params", "params"), ("macs", "MACs"),
                 ("latency_ms_b1", "ms @b1"))  # fmt: skip


@app.command()
def models(
    model: str | None = typer.Argument(None, help="List this model's versions instead."),
    alias: str = typer.Option("champion", help="The alias shown as the champion."),
    home: Path | None = HOME_OPT,
    tracking_uri: str | None = URI_OPT,
) -> None:
    """The registered models with their champion, versions and the champion's headline metrics."""
    from kdflow import catalog

    client = _client(home, tracking_uri)
    try:
        if model is not None:
            _print_versions(model, catalog.list_versions(client, model))
            return
        rows = catalog.list_models(client, alias)
    except catalog.CatalogError as err:
        raise _fail(err, 1) from None
    table = Table(title=f"registered models ({alias} and its metrics)")
    for col in ("model", alias, "versions", *(c for _, c in HEADLINE_COLS), "last move"):
        table.add_column(col, justify="left" if col in ("model", "last move") else "right", no_wrap=True)
    for r in rows:
        champ = f"v{r.champion}" if r.champion is not None else "-"
        cells = [_shown(r.headline, k) for k, _ in HEADLINE_COLS]
        table.add_row(r.name, champ, str(r.versions), *cells, r.last_move)
    _print_table(table)


def _print_versions(model: str, versions) -> None:
    table = Table(title=f"{model}: versions")
    for col in ("ver", "candidate", "aliases", *(c for _, c in HEADLINE_COLS)):
        table.add_column(col, justify="left" if col in ("candidate", "aliases") else "right", no_wrap=True)
    for v, aliases, metrics, name in versions:
        table.add_row(f"v{v}", name, ", ".join(aliases), *[_shown(metrics, k) for k, _ in HEADLINE_COLS])
    _print_table(table)


def _print_table(table: Table) -> None:
    """A terminal shows what fits its width; a log or a pipe gets the whole table, however many columns."""
    width = console.width
    if not console.is_terminal:
        console.width = max(width, table_width(table))
    try:
        console.print(table)
    finally:
        console.width = width


@app.command()
def promote(
    model: str = typer.Argument(..., help="Registered model name."),
    version: int = typer.Argument(..., help="The version to promote."),
    reason: str = REASON_OPT,
    force: bool = typer.Option(False, "--force", help="Skip the champion gate."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Config whose registry settings (alias, gate, "
                                       "champion_metric, min_improvement) apply; the built-in default when omitted."),
    set_: list[str] | None = SET_OPT,
    home: Path | None = HOME_OPT,
    tracking_uri: str | None = URI_OPT,
) -> None:  # fmt: skip
    """Give VERSION the champion alias if it passes the pipeline's gate (or with --force); records who, why and
    the previous champion."""
    from kdflow import catalog

    cfg = _registry_cfg(model, config, set_)
    client = _client(home, tracking_uri)
    try:
        move = catalog.promote(client, cfg, version, reason, force)
    except catalog.CatalogError as err:
        raise _fail(err, 1) from None
    before = f"v{move.previous}" if move.previous is not None else "none"
    console.print(f"{escape(model)}: {cfg.alias} v{move.version} (was {before}): {escape(move.reason)}", soft_wrap=True)


@app.command()
def rollback(
    model: str = typer.Argument(..., help="Registered model name."),
    reason: str = REASON_OPT,
    config: Path | None = CONFIG_OPT,
    set_: list[str] | None = SET_OPT,
    home: Path | None = HOME_OPT,
    tracking_uri: str | None = URI_OPT,
) -> None:
    """Move the champion alias back to the previous champion, from its recorded history."""
    from kdflow import catalog

    cfg = _registry_cfg(model, config, set_)
    client = _client(home, tracking_uri)
    try:
        move = catalog.rollback(client, cfg, reason)
    except catalog.CatalogError as err:
        raise _fail(err, 1) from None
    console.print(f"{escape(model)}: {cfg.alias} back to v{move.version} (was v{move.previous})", soft_wrap=True)


@app.command()
def show(
    run: str | None = typer.Argument(None, help="Pipeline run id or name (default: the latest pipeline run)."),
    home: Path | None = HOME_OPT,
    tracking_uri: str | None = URI_OPT,
) -> None:
    """A pipeline run's final table and decision (with its reasons), read back from MLflow."""
    from kdflow import catalog

    client = _client(home, tracking_uri)
    try:
        parent = catalog.pipeline_run(client, run)
        summary = catalog.run_summary(client, parent)
    except catalog.CatalogError as err:
        raise _fail(err, 1) from None
    started = parent.info.start_time
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(started / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if started else "?"
    console.print(
        f"pipeline run {escape(parent.info.run_name or '')} ({parent.info.run_id}), {parent.info.status}, "
        f"started {when}",
        soft_wrap=True,
        highlight=False,
    )
    _print_summary(summary)


def main() -> None:
    """The console entry point: the typer app, then a fast exit.

    The command's own work ends with its exit code; what remains is the interpreter tearing down the thousands
    of modules kfp, MLflow and pandas loaded (0.3-0.6 s here). Exit handlers still run and output is flushed,
    then the process leaves without that teardown."""
    import atexit

    try:
        app()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C before a local run's steps start (they have their own handler): no traceback
        print("\ninterrupted", file=sys.stderr)
        code = 130
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
