"""Epoch checkpoints of a training run, so that a step killed mid-training continues from its last epoch.

`fit_many` given a `Checkpoints` saves, at the end of an epoch, everything the next epoch depends on: every
student's weights, optimizer, schedule, gradient scaler, its own RNG stream, best state and early-stopping
count, the stream's generator, the process's global RNG states and the epoch. Started again with the same
students, data and seed, it loads the latest checkpoint after its usual set-up and continues with the next
epoch, so a resumed run draws exactly the batches and random numbers the uninterrupted one did and ends with
bit-identical weights (on the same device and thread count).

Where checkpoints go is a `Store`: a folder (`DirStore`), or the artifacts of an MLflow run (`RunStore`: the
pipeline's parent run, which a retried pod or a resumed local run finds again, so checkpoints outlive the pod
that wrote them). Each key keeps two slots and a pointer written after the slot, so a kill while writing leaves
the previous checkpoint readable.

Writing costs time, so a checkpoint is written at an epoch's end only once `every_s` seconds have passed since
the last one and writing it costs at most `max_share` of the training time since then (the last write's cost
tells); and always when the fit ends, so a finished fit is never trained again. Files are loaded weights-only.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

POINTER = "latest.json"


class Store(Protocol):
    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes) -> None: ...


class DirStore:
    """Checkpoints in a local folder; each file replaced atomically."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def read(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def write(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


class RunStore:
    """Checkpoints as artifacts of the MLflow run `run_id` under `prefix`: reachable through the tracking
    server's REST API alone, from any pod of the pipeline run."""

    def __init__(self, run_id: str, prefix: str):
        self.run_id, self.prefix = run_id, prefix.strip("/")

    def read(self, name: str) -> bytes | None:
        import mlflow

        path = f"{self.prefix}/{name}"
        folder, _, base = path.rpartition("/")
        client = mlflow.MlflowClient()
        if base not in {Path(f.path).name for f in client.list_artifacts(self.run_id, folder)}:
            return None
        with tempfile.TemporaryDirectory(prefix="kdflow-ckpt-") as tmp:
            return Path(client.download_artifacts(self.run_id, path, tmp)).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        import mlflow

        path = f"{self.prefix}/{name}"
        folder, _, base = path.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="kdflow-ckpt-") as tmp:
            (Path(tmp) / base).write_bytes(data)
            mlflow.MlflowClient().log_artifact(self.run_id, str(Path(tmp) / base), folder)


@dataclass
class Checkpoints:
    """One fit's checkpoints under `key` in `store`, and when to write them."""

    store: Store
    key: str
    every_s: float = 30.0
    max_share: float = 0.02
    saved: int = 0  # checkpoints written by this process
    resumed_from: int | None = None  # the epoch the fit continued after, when it loaded one
    seconds: float = 0.0  # time spent writing them
    _last_end: float = field(default_factory=lambda: time.monotonic())
    _last_cost: float = 0.0
    _slot: int = 0

    def load(self) -> dict | None:
        """The latest readable checkpoint of this key, or None."""
        for slot in self._slots():
            blob = self.store.read(f"{self.key}/slot-{slot}.pt")
            if blob is None:
                continue
            try:
                state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception:  # a write cut short by a kill: the other slot holds the one before
                continue
            self._slot = 1 - slot  # the next write replaces the other slot
            self.resumed_from = int(state["epoch"])
            return state
        return None

    def _slots(self) -> list[int]:
        """Slots newest first: the pointer's, then the other."""
        try:
            newest = int(json.loads(self.store.read(f"{self.key}/{POINTER}") or b"{}").get("slot", 0))
        except (ValueError, AttributeError):
            newest = 0
        return [newest, 1 - newest]

    def due(self) -> bool:
        since = time.monotonic() - self._last_end
        return since >= self.every_s and self._last_cost <= self.max_share * since

    def save(self, state: dict) -> None:
        start = time.monotonic()
        buf = io.BytesIO()
        torch.save(state, buf)
        self.store.write(f"{self.key}/slot-{self._slot}.pt", buf.getvalue())
        self.store.write(f"{self.key}/{POINTER}", json.dumps({"slot": self._slot, "epoch": state["epoch"]}).encode())
        self._slot = 1 - self._slot
        self._last_end = time.monotonic()
        self._last_cost = self._last_end - start
        self.seconds += self._last_cost
        self.saved += 1


def global_rng_state(device: torch.device) -> dict:
    """The process's RNG states (torch, CUDA on `device`, numpy, Python), in weights-only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }


def set_global_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
