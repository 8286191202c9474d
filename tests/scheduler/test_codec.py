"""Binary payloads: exact round trips with compact dtypes; garbage is refused, not guessed."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest

from mopd.scheduler.codec import CodecError, decode, encode
from mopd.types import MicroBatch, Prompt, RolloutSample, ScoredSample


def scored(sample_id: str = "p/0", t: int = 5, experts: int = 8, seed: int = 0) -> ScoredSample:
    rng = np.random.default_rng(seed)
    prompt = Prompt(
        "p",
        "chain_sum",
        "arithmetic",
        rng.integers(1, 100, 4),
        text="1+2=",
        answer="3",
        metadata={"k": [1, 2]},
    )
    dtype = np.uint8 if experts <= 256 else np.uint16
    sample = RolloutSample(
        sample_id,
        prompt,
        rng.integers(0, 100, t),
        rng.normal(size=t),
        np.full(t, 3),
        "stop",
        rng.integers(0, experts, (4 + t - 1, 3, 2)).astype(dtype),
        text="3",
    )
    return ScoredSample(
        sample, reward=1.0, advantage=0.75, logp_teacher_T=rng.normal(size=t), teacher="arith"
    )


@pytest.mark.parametrize("experts", [8, 300])
def test_round_trip_is_exact_and_compact(experts: int):
    s = scored(experts=experts)
    back = decode(encode(s))
    assert isinstance(back, ScoredSample)
    assert back.sample.sample_id == s.sample.sample_id and back.teacher == "arith"
    assert back.sample.prompt.metadata == {"k": [1, 2]} and back.sample.prompt.answer == "3"
    for a, b in [
        (back.sample.response_ids_T, s.sample.response_ids_T),
        (back.sample.logp_rollout_T, s.sample.logp_rollout_T),
        (back.sample.routes_SLk, s.sample.routes_SLk),
        (back.logp_teacher_T, s.logp_teacher_T),
    ]:
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert back.sample.routes_SLk.dtype == (np.uint8 if experts <= 256 else np.uint16)


def test_multi_turn_fields_round_trip():
    s = scored(t=6)
    multi = dataclasses.replace(
        s, sample=dataclasses.replace(s.sample, loss_mask_T=[1, 1, 0, 0, 1, 1], reward=0.5)
    )
    back = decode(encode(multi))
    assert back.sample.loss_mask_T.dtype == np.uint8
    np.testing.assert_array_equal(back.sample.loss_mask_T, [1, 1, 0, 0, 1, 1])
    assert back.sample.reward == 0.5
    plain = decode(encode(s))  # single-turn records keep None
    assert plain.sample.loss_mask_T is None and plain.sample.reward is None


def test_payload_holds_raw_arrays_not_number_lists():
    s = scored(t=1000)
    payload = encode(s)
    raw = s.sample.routes_SLk.nbytes + s.sample.logp_rollout_T.nbytes + s.logp_teacher_T.nbytes
    raw += (
        s.sample.response_ids_T.nbytes
        + s.sample.versions_T.nbytes
        + s.sample.prompt.input_ids_P.nbytes
    )
    # Envelope overhead is small and fixed: no per-number encoding.
    assert raw <= len(payload) < raw + 600


def test_micro_batch_round_trip():
    mb = MicroBatch(
        np.arange(5),
        [0, 2, 5],
        [0, 1, 0, 1, 1],
        np.zeros(5),
        [0.5, -0.5],
        sample_ids=("a", "b"),
        domains=("x", "y"),
    )
    back = decode(encode(mb))
    assert back.sample_ids == ("a", "b") and back.domains == ("x", "y")
    np.testing.assert_array_equal(back.loss_mask_N, mb.loss_mask_N)


def test_garbage_is_refused():
    with pytest.raises(CodecError):
        decode(b"\x00\xffnot msgpack at all")
    with pytest.raises(CodecError, match="not a record"):
        decode(msgpack.packb({"a": 1}))
    with pytest.raises(CodecError, match="unknown record type"):
        decode(msgpack.packb({"__t": "os.system", "a": 1}))
    bad_dtype = msgpack.ExtType(1, msgpack.packb(("|O", [1])) + b"\x00" * 8)
    with pytest.raises(CodecError, match="not allowed"):
        decode(
            msgpack.packb(
                {
                    "__t": "Prompt",
                    "prompt_id": "p",
                    "source": "s",
                    "domain": "d",
                    "input_ids_P": bad_dtype,
                }
            )
        )
    with pytest.raises(TypeError, match="can be encoded"):
        encode({"a": 1})
