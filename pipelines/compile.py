"""Compile the pipeline to KFP IR YAML, with the config's values as the run parameters' defaults."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from kdflow.config import Config
from kdflow.pipelines.kdflow_pipeline import build_pipeline


def pipeline_arguments(cfg: Config, tracking_uri: str = "") -> dict:
    return {
        "config_json": cfg.to_json(),
        "candidates": [c["name"] for c in cfg.candidates()],
        "tracking_uri": tracking_uri,
    }


def compile_pipeline(cfg: Config, out: str | Path, tracking_uri: str = "") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        build_pipeline(cfg.cluster), str(out), pipeline_parameters=pipeline_arguments(cfg, tracking_uri)
    )
    return out
