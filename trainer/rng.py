"""Save and restore every random generator a trainer process draws from, for exact resumes.

A resumed run must draw the same random numbers as the uninterrupted one, so a checkpoint
holds, per rank (``rng_rank<R>.pt``), the state of::

    torch     the CPU generator
    cuda      ``cuda="all"``: one state per visible CUDA device, a list (the torch backend,
              whose process may see several); ``cuda="current"``: the current device's state,
              one tensor (Megatron: one process per GPU, so the file restores in a process
              that sees another number of devices)
    numpy     numpy's global MT19937, as tensors (keys, pos, gauss cache)
    python    ``random``'s state
    tracker   optional: named CUDA RNG states of a tracker with ``get_states`` /
              ``set_states`` (Megatron's ``CudaRNGStatesTracker``, which forks the CUDA
              generator for model-parallel regions); pass the tracker to both functions

Older checkpoints are read too: the Megatron backend used to save the numpy state as numpy's
own tuple, and no tracker states; ``restore_rng_state`` accepts both numpy shapes (and both
CUDA shapes, whichever ``cuda`` wrote them).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "RngTracker",
    "capture_rng_state",
    "load_rng_state",
    "restore_rng_state",
    "rng_file",
    "save_rng_state",
]


class RngTracker(Protocol):
    """Named RNG states kept outside the default generators (Megatron's CUDA RNG tracker)."""

    def get_states(self) -> dict[str, Any]: ...

    def set_states(self, states: dict[str, Any]) -> None: ...


# What ``capture_rng_state(cuda=...)`` saves of the CUDA generators.
_CUDA = {
    "all": lambda: torch.cuda.get_rng_state_all(),
    "current": lambda: torch.cuda.get_rng_state(),
}


def rng_file(directory: str | Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its RNG state inside a checkpoint directory."""
    return Path(directory) / f"rng_rank{rank}.pt"


def _numpy_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "pos": int(np_state[2]),
        "has_gauss": int(np_state[3]),
        "cached_gaussian": float(np_state[4]),
    }


def _set_numpy_state(state: Any) -> None:
    if not isinstance(state, Mapping):  # numpy's own tuple (older Megatron checkpoints)
        np.random.set_state(state)
        return
    np.random.set_state(
        (
            "MT19937",
            state["keys"].numpy().astype(np.uint32),
            state["pos"],
            state["has_gauss"],
            state["cached_gaussian"],
        )
    )


def _set_cuda_state(state: Any) -> None:
    if isinstance(state, torch.Tensor):  # cuda="current"
        torch.cuda.set_rng_state(state)
    else:
        torch.cuda.set_rng_state_all(state)


def capture_rng_state(cuda: str = "all", tracker: RngTracker | None = None) -> dict[str, Any]:
    """The state of every generator of this process (see the module docstring)."""
    if cuda not in _CUDA:
        raise ValueError(f"cuda={cuda!r}; accepted values: {', '.join(_CUDA)}")
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = _CUDA[cuda]()
    if tracker is not None:
        state["tracker"] = tracker.get_states()
    return state


def restore_rng_state(state: Mapping[str, Any], tracker: RngTracker | None = None) -> None:
    """Put back a ``capture_rng_state`` result (or an older checkpoint's RNG state).

    The CUDA part is skipped on a machine without CUDA, the tracker's when the state has none.
    """
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    _set_numpy_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        _set_cuda_state(state["cuda"])
    if tracker is not None and "tracker" in state:
        tracker.set_states(dict(state["tracker"]))


def save_rng_state(path: str | Path, cuda: str = "all", tracker: RngTracker | None = None) -> None:
    """Write ``capture_rng_state(cuda, tracker)`` to file ``path``."""
    torch.save(capture_rng_state(cuda, tracker), path)


def load_rng_state(path: str | Path, tracker: RngTracker | None = None) -> None:
    """Restore the RNG state saved in file ``path`` (``torch.save`` of ``capture_rng_state``)."""
    # Older Megatron files hold numpy arrays, which weights_only loading refuses.
    restore_rng_state(torch.load(path, map_location="cpu", weights_only=False), tracker)
