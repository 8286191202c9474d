"""trainer.rng: one RNG capture/restore for both backends; earlier checkpoints' formats load."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainer.rng import (
    capture_rng_state,
    load_rng_state,
    restore_rng_state,
    rng_file,
    save_rng_state,
)


def _draws() -> tuple:
    return (torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), np.random.randn())


class _Tracker:
    """The get_states / set_states interface of Megatron's CudaRNGStatesTracker."""

    def __init__(self) -> None:
        self.states_: dict = {"model-parallel-rng": torch.tensor([1, 2], dtype=torch.uint8)}

    def get_states(self) -> dict:
        return dict(self.states_)

    def set_states(self, states: dict) -> None:
        self.states_ = states


def test_restore_replays_every_generator():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    np.random.randn()  # a cached gaussian is part of numpy's state
    for cuda in ("all", "current"):
        state = capture_rng_state(cuda=cuda)
        first = _draws()
        restore_rng_state(state)
        assert _draws() == first
    with pytest.raises(ValueError, match="cuda='some'"):
        capture_rng_state(cuda="some")


def test_tracker_states_round_trip_through_a_file(tmp_path):
    tracker = _Tracker()
    save_rng_state(rng_file(tmp_path, 3), cuda="current", tracker=tracker)
    assert rng_file(tmp_path, 3) == tmp_path / "rng_rank3.pt"
    first = _draws()
    tracker.states_ = {"model-parallel-rng": torch.tensor([9], dtype=torch.uint8)}
    load_rng_state(rng_file(tmp_path, 3), tracker=tracker)
    assert _draws() == first
    assert tracker.states_["model-parallel-rng"].tolist() == [1, 2]
    # A state without tracker states (older Megatron files, the torch backend) leaves it alone.
    restore_rng_state(capture_rng_state(), tracker=tracker)
    assert tracker.states_["model-parallel-rng"].tolist() == [1, 2]


def test_states_the_backends_wrote_before_still_load():
    np.random.seed(7)
    torch.manual_seed(7)
    random.seed(7)
    legacy_megatron = {  # numpy's own tuple, as trainer/megatron/backend.py saved it
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    first = _draws()
    restore_rng_state(legacy_megatron)
    assert _draws() == first
    np_state = np.random.get_state()
    legacy_torch = {  # numpy as tensors, as trainer/torch_backend.py saved it
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    first = _draws()
    restore_rng_state(legacy_torch)
    assert _draws() == first
    new = capture_rng_state()
    assert set(new["numpy"]) == {"keys", "pos", "has_gauss", "cached_gaussian"}
    again = _draws()
    restore_rng_state(torch.load(_saved(new), weights_only=False))
    assert _draws() == again


def _saved(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf
