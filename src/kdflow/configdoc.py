"""The config reference (`docs/config.md`, `kdflow config reference`): every key of the schema in
`kdflow.config` with its type, allowed range, default and description, generated from the schema itself."""

from __future__ import annotations

import ast
import functools
import inspect
import json
import textwrap
import types
import typing
from typing import Any

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from kdflow.config import Config, load_config
from kdflow.configkeys import section_of

REGENERATE = "kdflow config reference -o docs/config.md"
HEADER = f"""# Config reference

Every key of a kdflow run config (`src/kdflow/config.py`), section by section: its type and allowed values, its
default (what a config file that leaves the key out gets) and what it does. A key is written as `--set` takes it;
`[i]` is an entry of a list (`--set distill.losses[0].alpha=0.3`). The column *built-in* shows where `kdflow run`
without `--config` (the built-in default run, spelled out in `configs/default.yaml`) sets another value.
`kdflow config show [-c FILE] [--set KEY=VALUE ...]` prints a whole resolved config.

Generated from the schema by `{REGENERATE}`; a test keeps it equal to the schema.
"""


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type: `int`, `"sgd" | "adamw"`, `list[int] | null`, `section`."""
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is list:
        inner = args[0]
        return "list of sections" if section_of(inner) else f"list[{type_name(inner)}]"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict:
        return f"mapping {type_name(args[0])} → {type_name(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def constraints(field: FieldInfo) -> str:
    """The field's bounds and pattern: `≥ 0, ≤ 10000`, `matches ^[0-9]+s$`."""
    out = []
    for m in field.metadata:
        for cls, attr, sign in ((at.Gt, "gt", ">"), (at.Ge, "ge", "≥"), (at.Lt, "lt", "<"), (at.Le, "le", "≤")):
            if isinstance(m, cls):
                bound = getattr(m, attr)
                out.append(f"{sign} {bound:g}" if isinstance(bound, float) else f"{sign} {bound}")
        if isinstance(m, at.MinLen):
            out.append(f"at least {m.min_length} long")
        if isinstance(m, at.MaxLen):
            out.append(f"at most {m.max_length} long")
        if getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    return ", ".join(out)


def shown(value: Any) -> str:
    """A default as a cell: compact JSON, a list of sections by its entries' names."""
    if value is PydanticUndefined:
        return "*required*"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        names = [getattr(v, "name", None) for v in value]
        n = f"{len(value)} entr{'y' if len(value) == 1 else 'ies'}"
        return f"{n}: {', '.join(names)}" if all(names) else n
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(to_jsonable_python(value), ensure_ascii=False).replace("|", "\\|") + "`"


@functools.cache
def field_docs(cls: type[BaseModel]) -> dict[str, str]:
    """Each field of `cls` (and of the models it derives from) with its docstring: the string literal right
    under the field in the class body."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, doc in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(doc.value.value)
    return docs


def sections(
    cls: type[BaseModel], prefix: str, default: BaseModel | None, builtin: BaseModel | None
) -> typing.Iterator[tuple[str, type[BaseModel], list[tuple]]]:
    """(key, section class, rows) for `cls` and then every section below it, depth first; each row is
    (key, type, range, default, built-in value or "", description). A list's entries are keyed `[i]`."""
    rows, below = [], []
    for name, field in cls.model_fields.items():
        value = getattr(default, name) if default is not None else field.get_default(call_default_factory=True)
        built = getattr(builtin, name) if builtin is not None else None
        differs = builtin is not None and to_jsonable_python(built) != to_jsonable_python(value)
        key = f"{prefix}.{name}" if prefix else name
        sub = section_of(field.annotation)
        rows.append(
            (
                key,
                type_name(field.annotation),
                constraints(field),
                "see below" if sub and isinstance(value, BaseModel) else shown(value),
                shown(built) if differs and not isinstance(built, BaseModel) else "",
                " ".join(field_docs(cls).get(name, "").split()).replace("|", "\\|"),  # (a cell's bar escaped)
            )
        )
        if sub is None:
            continue
        if typing.get_origin(field.annotation) is list:  # entries: each its own defaults, the class's
            below.append((sub, f"{key}[i]", None, None))
        else:
            inst = value if isinstance(value, BaseModel) else None
            below.append((sub, key, inst, built if isinstance(built, BaseModel) else None))
    yield prefix, cls, rows
    for sub, key, inst, built in below:
        yield from sections(sub, key, inst, built)


def reference_markdown() -> str:
    """The whole reference, as checked in at docs/config.md."""
    out = [HEADER]
    for key, cls, rows in sections(Config, "", Config(), load_config()):
        doc = " ".join((cls.__doc__ or "").split())
        out.append(f"\n## `{key}`\n\n{doc}\n" if key else f"\n## top level\n\n{doc}\n")
        out.append("| key | type | range | default | built-in | description |")
        out.append("|---|---|---|---|---|---|")
        for key, typ, rng, dflt, built, desc in rows:
            out.append(f"| `{key}` | {typ} | {rng} | {dflt} | {built} | {desc} |")
    return "\n".join(out) + "\n"
