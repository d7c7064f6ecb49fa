"""What every step shares: the step context (config + where its MLflow runs go), the model that is registered,
the small files steps hand each other (`info.json`, a distill step's `candidates.json`) and their paths."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdflow import data, deploy, evaluate, tracking
from kdflow.config import Config, config_from_json
from kdflow.data import ImageSet, Normalizer, load_imageset, load_split
from kdflow.data.dataset import SPLITS
from kdflow.engine.resume import Checkpoints, RunStore
from kdflow.models import checkpoint
from kdflow.runtime import timing

CHECKPOINTS = "checkpoints"  # the parent run's artifact folder of the training steps' epoch checkpoints
INFO_FILE = "info.json"  # each step output's run id, model URI and metrics
GROUP_FILE = "candidates.json"  # a distill step's output: the names of its candidates, each in a subfolder


@dataclass
class StepContext:
    """What every step needs: the validated config and where its MLflow runs go."""

    cfg: Config
    tracking_uri: str
    experiment_id: str
    parent_id: str
    pipeline_run_id: str

    @classmethod
    def open(cls, *, config_json: str, tracking_uri: str, pipeline_run_id: str, pipeline_run_name: str) -> StepContext:
        """From the pipeline-run strings every component passes on: the config, the MLflow store, the KFP run."""
        cfg = config_from_json(config_json)
        uri = tracking.resolve_tracking_uri(tracking_uri or None)
        exp = tracking.ensure_experiment(cfg.experiment, uri)  # also points this process at the store
        pipeline_run_id, name = tracking.resumed(pipeline_run_id, pipeline_run_name or pipeline_run_id)
        parent = tracking.parent_run_id(exp, pipeline_run_id, name, cfg.flat())
        return cls(cfg, uri, exp, parent, pipeline_run_id)

    def checkpoints(self, step: str, fit: str, iteration: str = "") -> Checkpoints | None:
        """Where the fit `fit` of step `step` (and loop iteration, e.g. a distill step's candidates) keeps its
        epoch checkpoints: the parent run's artifacts, which a retried pod or a resumed run finds again. None
        when `checkpoint.enabled` is off."""
        import hashlib

        c = self.cfg.checkpoint
        if not c.enabled:
            return None
        folder = step + (f"-{hashlib.sha1(iteration.encode()).hexdigest()[:10]}" if iteration else "")
        return Checkpoints(RunStore(self.parent_id, f"{CHECKPOINTS}/{folder}"), fit, c.every_s, c.max_share)

    @contextlib.contextmanager
    def child(self, name: str, step: str, tags: dict[str, str] | None = None):
        """A child run of the pipeline's parent run; a failure marks both FAILED in MLflow."""
        try:
            with tracking.child_run(self.experiment_id, self.parent_id, name, step, tags) as run:
                yield run
        except BaseException:
            tracking.end_run(self.parent_id, "FAILED")
            raise


class ServingModel(nn.Sequential):
    """What is registered: normalisation + network, so callers send raw pixels as float32 (N, C, H, W) in
    [0, 255] and get logits (N, classes)."""

    def __init__(self, normalizer: Normalizer, net: nn.Module):
        super().__init__(normalizer, net)


def splits(data_dir: str, task: str) -> dict[str, ImageSet]:
    return {s: load_imageset(data_dir, task, s) for s in SPLITS}


def write_info(directory: str | Path, info: dict) -> None:
    (Path(directory) / INFO_FILE).write_text(json.dumps(info, indent=1))


def read_info(directory: str | Path) -> dict:
    return json.loads((Path(directory) / INFO_FILE).read_text())


def log_servable(model: nn.Module, normalizer: Normalizer, data_dir: str) -> str:
    """Log `model` behind its normaliser as the active run's servable pt2 model; returns its `models:/` URI."""
    x, _ = load_split(data_dir, "target", "val")
    return tracking.log_model(ServingModel(normalizer, model), x[:4].float())


def profile(model: nn.Module, normalizer: Normalizer, data_dir: str, cfg: Config, ckpt_dir: str) -> dict:
    """Size and speed of a model (`evaluate.profile`), on normalised target images, with its checkpoint's size."""
    with timing.compute():
        x, _ = load_split(data_dir, "target", "train")
        example = normalizer(x[:8]).cpu()
        return evaluate.profile(model, example, checkpoint.file_size(ckpt_dir), cfg.evaluate)


ONNX_FILE = "model.onnx"  # the teacher step's ONNX export, beside its checkpoint: each evaluate step times it


def export_onnx(name: str, model: nn.Module, norm: Normalizer, data_dir: str, cfg: Config, path: str | Path) -> dict:
    """`model` behind its normaliser exported to ONNX at `path` (`kdflow.deploy`), checked against PyTorch on
    the target test split (a mismatch beyond `export.parity_atol` fails, naming `name`), with the class names in
    its metadata; returns its parity and ONNX Runtime metrics (`deploy.ort_profile`)."""
    served = ServingModel(norm, model).cpu().eval()
    manifest = data.read_manifest(data_dir)
    test_x, _ = load_split(data_dir, "target", "test")
    with timing.compute():
        deploy.export_onnx(served, test_x[:4].float(), path, cfg.export.opset)
        deploy.set_classes(path, manifest["tasks"]["target"]["classes"])
        sess = deploy.session(path, cfg.evaluate.latency_threads)
        p = deploy.parity(evaluate.predict(served, test_x, nn.Identity()), deploy.run(sess, test_x))
        deploy.check_parity(name, p, cfg.export.parity_atol, len(test_x))
        ort = ort_profile(path, test_x, cfg)
    return {**p.metrics(), **ort}


def ort_profile(path: str | Path, x, cfg: Config) -> dict[str, float]:
    """The ONNX model at `path` timed in ONNX Runtime on images `x` as `cfg.evaluate` says (`deploy.ort_profile`)."""
    e = cfg.evaluate
    return deploy.ort_profile(
        path, x[:8], e.latency_batch_sizes, e.latency_warmup, e.latency_repeats, e.latency_threads
    )


def log_onnx(path: str | Path, data_dir: str) -> str:
    """Log the ONNX file at `path` into the active run next to its pt2 model (same signature, the class names in
    its metadata); returns its `models:/` URI."""
    x, _ = load_split(data_dir, "target", "val")
    classes = data.read_manifest(data_dir)["tasks"]["target"]["classes"]
    return tracking.log_onnx_model(path, x[:4].float(), classes)


def pruned_dir(root: str | Path, ratio: float) -> Path:
    """Where the prune step writes the network pruned at `ratio`."""
    return Path(root) / f"ratio-{ratio:g}"


SEEDS_DIR = "seeds"  # a candidate's models under its further training seeds: <candidate>/seeds/<seed>/


def seed_dir(cdir: str | Path, seed: int) -> Path:
    """Where a candidate's model under a further training seed (`distill.seeds`) lies: written by distill,
    scored by evaluate."""
    return Path(cdir) / SEEDS_DIR / str(seed)


def write_group(student_dir: str | Path, names: list[str]) -> None:
    Path(student_dir).mkdir(parents=True, exist_ok=True)
    (Path(student_dir) / GROUP_FILE).write_text(json.dumps(names))


def candidate_dirs(student_dir: str | Path) -> list[Path]:
    """The per-candidate folders of one distill step's output, in the order they were trained."""
    names = json.loads((Path(student_dir) / GROUP_FILE).read_text())
    return [Path(student_dir) / n for n in names]


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A local state dict, weights only (no code is unpickled)."""
    return torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
