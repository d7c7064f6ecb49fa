"""Compile the pipeline to KFP IR YAML, with the config's values as the run parameters' defaults."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from kdflow.config import ClusterConfig, Config, ConfigError, first_difference
from kdflow.pipelines.kdflow_pipeline import build_pipeline


def pipeline_arguments(cfg: Config, tracking_uri: str = "") -> dict:
    """The run parameters: the config, the distill steps' work and where MLflow is."""
    from kdflow.objectives import candidate_groups  # deferred: the objectives import torch

    return {
        "config_json": cfg.to_json(),
        "candidates": candidate_groups(cfg),  # one distill step per item: "name" or "name1,name2,..."
        "tracking_uri": tracking_uri,
    }


def cluster_settings(cfg: Config) -> ClusterConfig:
    """The config's cluster section, with data-prep caching off when data comes from s3://: the objects behind
    a URI can change while the config (KFP's cache key) stays the same."""
    return cfg.cluster.model_copy(update={"cache_data_prep": False}) if cfg.data.from_object_store else cfg.cluster


def compile_pipeline(cfg: Config, out: str | Path, tracking_uri: str = "") -> Path:
    """Write the IR YAML. A credential written into the config is refused: the compiled spec (and the cluster's
    UI) would show it; the config names it as `${env:NAME}` instead, NAME coming from a Kubernetes Secret."""
    from kdflow.secrets import to_env

    data = cfg.model_dump(mode="json")
    referenced, credentials = to_env(data)
    if credentials:
        key = first_difference(referenced, data)
        raise ConfigError(
            f"{key} holds a credential, which the compiled pipeline would show: write it as ${{env:NAME}} and give "
            "the pods NAME from a Kubernetes Secret (cluster.s3_secret and cluster.secret_keys)"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        build_pipeline(cluster_settings(cfg)), str(out), pipeline_parameters=pipeline_arguments(cfg, tracking_uri)
    )
    return out
