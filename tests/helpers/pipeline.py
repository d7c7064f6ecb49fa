"""Reading the compiled pipeline IR."""

from __future__ import annotations


def all_tasks(spec: dict) -> dict:
    """Every task of the pipeline by name, whatever DAG (root, exit handler, loop) holds it."""
    out = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out
