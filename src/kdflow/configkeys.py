"""Config keys as paths through a pydantic schema: `--set` overrides with list indices
(`distill.losses[0].alpha=0.3`), "did you mean" for unknown keys, and the schema's sections walked by key.

Generic over the schema (it takes the root model class), so `kdflow.config` can use it without a cycle."""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from kdflow.errors import ConfigError

Part = typing.Union[str, int]  # noqa: UP007 - a runtime alias
_PIECE = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


def parse_key(dotted: str) -> list[Part]:
    """`distill.losses[0].alpha` → ["distill", "losses", 0, "alpha"]; a malformed key fails naming it."""
    parts: list[Part] = []
    for piece in dotted.split("."):
        m = _PIECE.fullmatch(piece.strip())
        if not m:
            raise ConfigError(
                f"--set {dotted}: cannot read the key part {piece!r} (keys are dotted names with list indices in "
                "brackets, e.g. distill.losses[0].alpha)"
            )
        parts.append(m.group(1))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return parts


def format_key(parts: typing.Iterable[Part]) -> str:
    """["distill", "losses", 0, "alpha"] → `distill.losses[0].alpha` (the form `--set` reads back)."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def section_of(annotation: Any) -> type[BaseModel] | None:
    """The model class in `X`, `X | None` or `list[X]` (the section a key of that type holds), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            if (found := section_of(arg)) is not None:
                return found
    return None


def model_at(root: type[BaseModel], loc: typing.Sequence[Part]) -> type[BaseModel] | None:
    """The section reached by `loc` (list indices step into a list's entries), None past a plain value."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue  # an entry of a list of sections: the same section type
        field = model.model_fields.get(part)
        model = section_of(field.annotation) if field is not None else None
    return model


def did_you_mean(root: type[BaseModel], loc: typing.Sequence[Part]) -> str:
    """For the unknown key at `loc`: `; did you mean distill.train.epochs?`, or the section's keys when nothing is
    close; "" when `loc` is not inside a known section."""
    model = model_at(root, loc[:-1])
    if model is None or isinstance(loc[-1], int):
        return ""
    keys = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {format_key([*loc[:-1], close[0]])}?"
    where = format_key(loc[:-1]) or "the top level"
    return f"; {where} has: {', '.join(keys)}"


def _field_default(model: type[BaseModel] | None, name: Part) -> tuple[bool, Any, type[BaseModel] | None]:
    """(known, JSON default, section type) of field `name` of `model`."""
    field = model.model_fields.get(name) if model is not None and isinstance(name, str) else None
    if field is None:
        return False, None, None
    default = to_jsonable_python(field.get_default(call_default_factory=True))
    return True, default, section_of(field.annotation)


def apply_override(data: dict, root: type[BaseModel], dotted: str, value: Any) -> None:
    """Set `dotted` (dotted names, list indices in brackets or as plain numbers) to `value` in the raw config
    mapping `data`, in place. A section or list the mapping lacks starts from its default in the schema (so
    `--set teacher.pretrain.lr=0.1` keeps the teacher's own pretrain defaults, and `distill.losses[0].alpha`
    addresses the default grid's first loss); an index past a list's end fails naming the list and its length."""
    parts = parse_key(dotted)
    node: Any = data
    model: type[BaseModel] | None = root
    done: list[Part] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if isinstance(part, str) and not part.isdigit():
                raise ConfigError(
                    f"--set {dotted}: {format_key(done)} is a list; address an entry by its index, "
                    f"e.g. {format_key([*done, 0])}"
                )
            part = int(part)
            if part >= len(node):
                span = f" (indices 0 to {len(node) - 1})" if node else ""
                raise ConfigError(
                    f"--set {dotted}: index {part} is out of range: {format_key(done)} has {len(node)} "
                    f"entr{'y' if len(node) == 1 else 'ies'}{span}"
                )
        elif isinstance(node, dict):
            if isinstance(part, int):
                raise ConfigError(f"--set {dotted}: {format_key(done)} is a section, not a list")
        else:
            raise ConfigError(f"--set {dotted}: {format_key(done)} is not a section")
        done.append(part)
        if last:
            node[part] = value
            return
        if isinstance(node, dict) and node.get(part) is None:
            known, default, section = _field_default(model, part)
            if known and section is None and not isinstance(default, (dict, list)):
                raise ConfigError(f"--set {dotted}: {format_key(done)} is not a section")
            if part not in node or section is not None:  # (an explicit null section is started afresh)
                node[part] = copy.deepcopy(default) if known and isinstance(default, (dict, list)) else {}
        if not isinstance(part, int):
            field = model.model_fields.get(part) if model is not None else None
            model = section_of(field.annotation) if field is not None else None
        node = node[part]
