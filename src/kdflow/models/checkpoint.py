"""Weights-only model files: `spec.json` (architecture + layer shapes) beside `model.pt` (a plain state dict).

Pruning changes layer shapes, so the registry architecture alone cannot rebuild a pruned network. The spec
therefore records every layer's shape attributes (channels, features, groups); loading builds the base
architecture, reshapes those layers, then loads the tensors with `torch.load(weights_only=True)`. No model
object is ever pickled, so a checkpoint from an untrusted run cannot execute code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdflow.models import zoo as models

SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features")
WEIGHTS_FILE = "model.pt"
SPEC_FILE = "spec.json"


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Shape attributes of every layer that has any, keyed by module path."""
    out = {}
    for name, m in model.named_modules():
        attrs = {a: int(getattr(m, a)) for a in SHAPE_ATTRS if isinstance(getattr(m, a, None), int)}
        if attrs:
            out[name] = attrs
    return out


def make_spec(arch: str, in_channels: int, num_classes: int, kwargs: dict[str, Any] | None = None) -> dict:
    return {"arch": arch, "in_channels": in_channels, "num_classes": num_classes, "kwargs": dict(kwargs or {})}


def build_from_spec(spec: dict) -> nn.Module:
    """The base architecture of `spec`, its layers reshaped to `spec["layers"]` (tensors still uninitialised)."""
    kwargs = {k: v for k, v in spec["kwargs"].items() if k != "weights"}  # never re-download for a rebuild
    model = models.build(spec["arch"], spec["in_channels"], spec["num_classes"], **kwargs)
    for name, attrs in spec.get("layers", {}).items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
    return model


def save(model: nn.Module, spec: dict, directory: str | Path) -> Path:
    """Write `spec.json` and `model.pt` into `directory`; returns the directory. Each file appears whole or not at
    all (written aside, then renamed into place): a crash mid-write leaves no truncated checkpoint behind."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "layers": layer_shapes(model)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=d))  # same names inside: torch.save names its records
    try:
        torch.save(state, staging / WEIGHTS_FILE)
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=1))
        os.replace(staging / WEIGHTS_FILE, d / WEIGHTS_FILE)
        os.replace(staging / SPEC_FILE, d / SPEC_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return d


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model saved by `save`; returns (model in eval mode, spec)."""
    d = Path(directory)
    spec = json.loads((d / SPEC_FILE).read_text())
    state = torch.load(d / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    model = build_from_spec(spec)
    _resize_to(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval(), spec


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each parameter/buffer the shape it has in `state`, so `load_state_dict` can fill it."""
    for key, tensor in state.items():
        owner_path, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        current = getattr(owner, leaf)
        if current is None or current.shape == tensor.shape:
            continue
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(torch.empty_like(tensor), requires_grad=current.requires_grad)
        else:
            owner._buffers[leaf] = torch.empty_like(tensor)


def file_size(directory: str | Path) -> int:
    """Serialized size in bytes of the weights file."""
    return (Path(directory) / WEIGHTS_FILE).stat().st_size
