"""Atomic checkpoint directories: a directory is a checkpoint only once it is committed.

A crash in the middle of a save must never leave something that loads as a valid checkpoint.
Every writer (the torch backend, the Megatron backend, weight export) follows one protocol:

1. ``begin(final)`` makes an empty hidden sibling ``.<name>.tmp-<token>`` of the final
   directory (same file system, so the rename in step 3 is atomic).
2. The writer puts its files there (any layout, any number of processes; multi-rank writers
   agree on ``token`` beforehand, one rank calls ``begin`` and the others find the directory
   with ``temp_path(final, token)`` after a barrier).
3. ``commit(tmp, final, meta)`` fsyncs every file, writes the ``COMMITTED`` marker (JSON:
   ``meta`` plus a timestamp) *last*, fsyncs it and the directory, renames the temp directory
   to its final name and fsyncs the parent. An existing ``final`` is replaced: it is moved
   aside first and deleted after the rename.

``save_on_ranks(final, token, write, ...)`` runs the three steps for a writer spread over
several ranks (the trainer backends' ``save``): rank 0 begins and commits, every rank writes
its part with its own ``write(tmp)``, barriers in between. A trainer checkpoint also holds
``trainer_state.json`` (``trainer_state`` / ``write_trainer_state``, written by rank 0) that
``read_trainer_state`` returns after checking the marker.

``atomic_dir(final)`` wraps the three steps in a ``with`` block and deletes the temp directory
if the block raises. A process killed mid-save leaves only a hidden temp directory without
a marker: ``load`` paths call ``require_committed`` (which refuses any directory without the
marker) and ``latest_checkpoint(root)`` only considers committed ``step_<N>`` directories.

Pure standard library (no torch), so every backend and tool can use it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "COMMITTED",
    "TRAINER_STATE",
    "abort",
    "atomic_dir",
    "begin",
    "checkpoint_dir",
    "commit",
    "is_committed",
    "latest_checkpoint",
    "list_checkpoints",
    "read_marker",
    "read_trainer_state",
    "require_committed",
    "save_on_ranks",
    "temp_path",
    "trainer_state",
    "write_trainer_state",
]

COMMITTED = "COMMITTED"
"""Name of the marker file; present only in fully written directories."""

TRAINER_STATE = "trainer_state.json"
"""A trainer checkpoint's step, version, layout and source model (JSON, written by rank 0)."""

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """The conventional directory of the checkpoint after ``step`` optimizer steps."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be a non-negative int")
    return Path(root) / f"step_{step:08d}"


def is_committed(path: str | Path) -> bool:
    """True if ``path`` is a directory holding the ``COMMITTED`` marker."""
    return (Path(path) / COMMITTED).is_file()


def read_marker(path: str | Path) -> dict[str, Any]:
    """The metadata stored in the marker of a committed directory."""
    marker = require_committed(path) / COMMITTED
    return json.loads(marker.read_text())


def require_committed(path: str | Path) -> Path:
    """Return ``path`` if it is a committed directory, else raise naming the problem and fix."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not is_committed(path):
        raise ValueError(
            f"{path} has no {COMMITTED} marker: its save was interrupted or it was not written "
            "by mopd; load the previous checkpoint instead (latest_checkpoint(root) finds it)"
        )
    return path


def list_checkpoints(root: str | Path) -> list[Path]:
    """Committed ``step_<N>`` directories under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and is_committed(child):
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The committed checkpoint with the highest step under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def temp_path(final: str | Path, token: str) -> Path:
    """Where ``begin(final, token)`` puts the temp directory (ranks other than the one that
    calls ``begin`` use it to find the directory they write into)."""
    final = Path(final)
    if final.name in ("", ".", ".."):
        raise ValueError(f"{final} is not a usable checkpoint directory name")
    return final.parent / f".{final.name}.tmp-{token}"


def begin(final: str | Path, token: str | None = None) -> Path:
    """Create (empty) and return the temp directory that will become ``final`` on commit.

    ``token`` names the temp directory; writers in several processes pass the same token
    (e.g. broadcast from rank 0) and find it with ``temp_path``. A stale temp directory of
    the same name is removed.
    """
    final = Path(final)
    tmp = temp_path(final, token or uuid.uuid4().hex)
    final.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: str | Path, final: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Make ``tmp`` durable, mark it committed (last), and rename it to ``final``."""
    tmp, final = Path(tmp), Path(final)
    if not tmp.is_dir():
        raise FileNotFoundError(f"temp directory {tmp} does not exist; call begin() first")
    _fsync_tree(tmp)
    marker = dict(meta or {})
    marker.setdefault("committed_at", time.time())
    (tmp / COMMITTED).write_text(json.dumps(marker, sort_keys=True) + "\n")
    _fsync_path(tmp / COMMITTED)
    _fsync_path(tmp)
    old = None
    if final.exists():
        # rename(2) cannot replace a non-empty directory: move the old one aside first.
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def abort(tmp: str | Path) -> None:
    """Delete an uncommitted temp directory (after a failed write)."""
    shutil.rmtree(Path(tmp), ignore_errors=True)


def save_on_ranks(
    final: str | Path,
    token: str,
    write: Callable[[Path], None],
    *,
    rank: int,
    barrier: Callable[[], None],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """The protocol for a checkpoint written by several ranks (every backend's ``save``).

    Rank 0 makes the temp directory named by ``token`` (the same on every rank); after a
    barrier every rank writes its part with ``write(tmp)``; after a second barrier rank 0
    commits (``meta`` in the marker); a third barrier lets no rank return before the commit.
    A rank whose ``write`` raises re-raises; on rank 0 the temp directory is removed first.
    """
    tmp = temp_path(final, token)
    if rank == 0:
        tmp = begin(final, token)
    barrier()
    try:
        write(tmp)
    except BaseException:
        if rank == 0:
            abort(tmp)
        raise
    barrier()
    if rank == 0:
        commit(tmp, final, meta)
    barrier()
    return Path(final)


def trainer_state(
    version: int, layout: Mapping[str, int], model_path: str | Path, loss: str, **extra: Any
) -> dict[str, Any]:
    """The ``trainer_state.json`` of a backend after ``version`` optimizer steps.

    ``layout`` is what a reload checks or warns about (world size, parallel sizes);
    ``extra`` comes last (e.g. ``backend``).
    """
    return {
        "step": version,
        "version": version,
        **layout,
        "model_path": str(model_path),
        "loss": loss,
        **extra,
    }


def write_trainer_state(directory: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` as ``trainer_state.json`` into a (temp) checkpoint directory."""
    (Path(directory) / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")


def read_trainer_state(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The committed checkpoint directory ``path`` and its ``trainer_state.json``."""
    path = require_committed(path)
    return path, json.loads((path / TRAINER_STATE).read_text())


@contextmanager
def atomic_dir(final: str | Path, meta: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temp directory to write into; commit it as ``final`` if the block succeeds.

    ``meta`` (JSON-serialisable) is stored in the marker. If the block raises, the temp
    directory is deleted and ``final`` (if it existed) is left untouched.
    """
    tmp = begin(final)
    try:
        yield tmp
    except BaseException:
        abort(tmp)
        raise
    commit(tmp, final, meta)
