"""Small file and process-environment helpers shared across the house.

``write_json_atomic``: a reader (a resuming run, an operator, a fault test) sees the old file
or the new one, never a half-written one, even across a power loss (the data is fsynced
before the rename). ``scoped_env``: set environment variables for the duration of a block
and put back exactly what was there.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["scoped_env", "write_json_atomic", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a fsynced temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: int | None = None) -> Path:
    """``payload`` as JSON at ``path``, atomically (see ``write_text_atomic``)."""
    text = json.dumps(payload, indent=indent)
    return write_text_atomic(path, text + "\n" if indent is not None else text)


@contextlib.contextmanager
def scoped_env(**values: str | None) -> Iterator[None]:
    """Set each ``KEY=value`` (None leaves that key as it is) for the block, then restore."""
    previous = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    for key, value in values.items():
        if value is not None:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, old in previous.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
