"""Field documentation of the config schema, read from the attribute docstrings.

Each schema field is followed by a string literal (PEP 257 attribute docstring); this
module reads them with ``ast`` so ``mopd config-docs`` can print what every field means,
its type and its default, straight from the single source of truth.
"""

from __future__ import annotations

import ast
import inspect
import itertools
from collections.abc import Iterator
from dataclasses import MISSING, fields, is_dataclass
from functools import cache

from omegaconf import MISSING as OMEGACONF_MISSING

from mopd.config import schema


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> docstring for one schema dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in itertools.pairwise(body):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = inspect.cleandoc(node.value.value)
    return docs


def describe(cls: type = schema.RunConfig, prefix: str = "") -> Iterator[str]:
    """Lines ``key (type, default): doc`` for every leaf field under ``cls``."""
    docs = field_docs(cls)
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        nested = getattr(schema, str(f.type).removeprefix("list[").removesuffix("]"), None)
        if is_dataclass(nested):
            suffix = "[i]" if str(f.type).startswith("list[") else ""
            head = inspect.cleandoc(nested.__doc__ or "")
            yield f"{key}{suffix}: {head}" if head else f"{key}{suffix}:"
            yield from describe(nested, f"{key}{suffix}.")
            continue
        if f.default is not MISSING and f.default != OMEGACONF_MISSING:
            default = repr(f.default)
        elif f.default_factory is not MISSING:
            default = repr(f.default_factory())
        else:  # no default, or OmegaConf's MISSING marker
            default = "required"
        yield f"  {key} ({f.type}, {default}): {docs.get(f.name, '')}"
