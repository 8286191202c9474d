"""What every protocol module shares: ``ProtocolError`` and the JSON helpers of the request
types (``json_fields`` turns a dataclass into its JSON body, ``int_tuple`` checks token ids)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np


class ProtocolError(ValueError):
    """A request or response does not follow the SGLang protocol (names what is wrong)."""


def json_fields(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dataclass's set fields as a JSON dict: None means "unset, use the server default"."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None or f.name in skip:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def int_tuple(name: str, values: Any) -> tuple[int, ...]:
    """``values`` (list, tuple or 1-d integer array) as a tuple of Python ints; ``name`` is
    the field the error names."""
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ProtocolError(
            f"{name} must be a 1-d sequence of ints, got {array.dtype} {array.shape}"
        )
    return tuple(int(v) for v in array.tolist())
