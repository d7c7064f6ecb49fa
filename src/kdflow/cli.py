"""The `kdflow` command: run the local mini-pipeline, compile the pipeline for Kubeflow."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdflow import tracking
from kdflow.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=None if sys.stdout.isatty() else 120)

CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML config; the built-in digits default when omitted.")
SET_OPT = typer.Option(None, "--set", help="Override one config key, e.g. --set distill.train.epochs=5.")


def _overrides(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


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
        help="Folder for the embedded MLflow store and local outputs [default: $KDFLOW_HOME or ./kdflow-home].",
    ),
    tracking_uri: str | None = typer.Option(
        None, help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI or the embedded store]."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the steps' full logs, not just progress."),
) -> None:
    """Run the whole pipeline locally (kfp.local), log to MLflow and promote a champion."""
    from kdflow.pipelines.local import PipelineFailed, run_local

    cfg = _load(config, set_).with_local_paths(Path.cwd())
    home = (home or tracking.kdflow_home()).expanduser().resolve()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.embedded_tracking_uri(home)
    n = len(cfg.candidates())
    console.print(
        f"[bold]kdflow[/bold] {cfg.experiment}: {cfg.data.setup} on {cfg.data.source}"
        f"{' → ' + cfg.data.target if cfg.data.target else ''}, {n} candidates; MLflow at {uri}"
    )
    try:
        summary = run_local(cfg, home, uri, verbose)
    except PipelineFailed as err:
        console.print(f"[red]pipeline failed:[/red] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(1) from None
    _print_summary(summary)
    if uri.startswith("sqlite:///"):
        console.print(f"Open the runs: [bold]mlflow ui --backend-store-uri {uri}[/bold]")


def _print_summary(summary: dict) -> None:
    d = summary["decision"]
    table = Table(title=f"{summary['model_name']}: teacher and candidates")
    for col in ("model", "val top-1", "test top-1", "params", "smaller", "ms @b1", "agrees", "version", "status"):
        table.add_column(col, justify="left" if col in ("model", "status") else "right")
    t = summary["teacher"]
    table.add_row(
        "teacher",
        f"{t['val_top1']:.2%}",
        f"{t['test_top1']:.2%}",
        f"{int(t['params']):,}",
        "1.0x",
        f"{t['latency_ms_b1']:.3f}",
        "",
        f"v{t['version']}",
        "",
    )
    for name, c in sorted(summary["candidates"].items(), key=lambda kv: -kv[1]["val_top1"]):
        mark = "champion" if c["version"] == d["champion_version"] else ("selected" if name == d["selected"] else "")
        if name in d["rejected"]:
            mark = f"policy: {d['rejected'][name]}"
        table.add_row(
            name,
            f"{c['val_top1']:.2%}",
            f"{c['test_top1']:.2%}",
            f"{int(c['params']):,}",
            f"{c['compression']:.1f}x",
            f"{c['latency_ms_b1']:.3f}",
            f"{c['teacher_agreement']:.2%}",
            f"v{c['version']}",
            mark,
        )
    console.print(table)
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
    path = compile_pipeline(cfg, output, tracking_uri)
    console.print(f"wrote {path} ({len(cfg.candidates())} candidates)")


if __name__ == "__main__":  # pragma: no cover
    app()
