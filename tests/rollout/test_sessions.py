"""Multi-turn sessions on the embedded engine (SGLang's session API): numbers against a plain
transformers forward of the whole conversation."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from rollout.engine import Engine, EngineConfig, Request, RequestError, SamplingParams
from rollout.engine import SessionParams as SP

PROMPT = list(range(40, 53))  # 13 tokens: past the tiny MiMo's sliding window (8)
# Tool observations: one shorter than the window, one longer (the ring wraps inside a turn).
OBSERVATIONS = [[250, 251, 252], list(range(200, 211))]


def make_engine(path, **kw) -> Engine:
    kw.setdefault("enable_return_routed_experts", True)
    return Engine(EngineConfig(model_path=str(path), dtype="float32", **kw)).start()


def sp(**kw) -> SamplingParams:
    return SamplingParams.from_dict(kw)


def converse(engine, sid, moe, temperature=0.7, max_new=(6, 5, 7), seed=None):
    """Three turns through one session; returns (outputs, stat deltas per turn, contexts)."""
    outs, deltas, contexts = [], [], []
    parent, context = None, []
    for turn, new in enumerate([PROMPT, *OBSERVATIONS]):
        before = dict(engine.stats)
        req = Request(
            tuple(new),
            sp(max_new_tokens=max_new[turn], temperature=temperature, ignore_eos=True, seed=seed),
            rid=f"{sid}-turn{turn}",
            return_logprob=True,
            return_routed_experts=moe,
            session=SP(id=sid, rid=parent),
        )
        out = engine.generate([req], timeout=120)[0]
        context = context + list(new)
        contexts.append(list(context))
        context = context + out.output_ids
        outs.append(out)
        deltas.append({k: engine.stats[k] - before[k] for k in before})
        parent = req.rid
    return outs, deltas, contexts


@pytest.mark.parametrize("arch", ["mimo", "qwen3_moe", "llama"])
def test_three_turns_reuse_the_cache_and_match_a_teacher_forced_forward(
    arch, tiny_ckpts, reference
):
    ref = reference(arch)
    moe = ref.top_k > 0
    engine = make_engine(tiny_ckpts[arch], max_running_requests=4, random_seed=5)
    try:
        sid = engine.open_session()
        outs, deltas, contexts = converse(engine, sid, moe)
    finally:
        engine.shutdown()
    # (a) the sequence is the prompt, each turn's tokens as generated and each observation
    # as sent, in order; each turn's prompt is the whole context so far (SGLang).
    full = PROMPT + outs[0].output_ids + OBSERVATIONS[0] + outs[1].output_ids
    full += OBSERVATIONS[1] + outs[2].output_ids
    assert contexts[2] + outs[2].output_ids == full
    assert [o.prompt_tokens for o in outs] == [len(c) for c in contexts]
    assert [len(o.output_ids) for o in outs] == [6, 5, 7]
    # (d) later turns prefill only the last sampled token of the turn before and the
    # observation; the rest comes from the session's cache.
    assert deltas[0]["prefill_tokens"] == len(PROMPT) and outs[0].cached_tokens == 0
    for turn in (1, 2):
        cached = len(contexts[turn - 1]) + len(outs[turn - 1].output_ids) - 1
        assert outs[turn].cached_tokens == cached == deltas[turn]["cached_tokens"]
        assert deltas[turn]["prefill_tokens"] == 1 + len(OBSERVATIONS[turn - 1])
    # (b) every generated token's log-prob equals a teacher-forced forward of the whole
    # sequence (temperature-scaled, as SGLang reports sampled tokens).
    logits, routes = ref.forward(full)
    logp = torch.log_softmax(logits / 0.7, dim=-1)
    for turn, out in enumerate(outs):
        start = len(contexts[turn])
        want = [float(logp[start - 1 + i, t]) for i, t in enumerate(out.output_ids)]
        np.testing.assert_allclose([lp for lp, _ in out.output_token_logprobs], want, atol=1e-4)
    # (c) routes cover every position run forward (S - 1 rows) and equal the router's top-k;
    # the rows of earlier turns are the very ones those turns returned.
    if not moe:
        assert all(o.routed_experts is None for o in outs)
        return
    last = outs[2].routed_experts
    assert last.shape == (len(full) - 1, ref.num_layers, ref.top_k)
    np.testing.assert_array_equal(np.sort(last, -1), np.sort(routes[:-1].numpy(), -1))
    for turn in (0, 1):
        earlier = outs[turn].routed_experts
        assert earlier.shape[0] == len(contexts[turn]) + len(outs[turn].output_ids) - 1
        np.testing.assert_array_equal(last[: earlier.shape[0]], earlier)


def test_session_turns_batch_with_fresh_requests(tiny_ckpts, reference):
    """Two sessions' second turns and a fresh prompt share one prefill forward."""
    ref = reference("mimo")
    engine = make_engine(tiny_ckpts["mimo"], max_running_requests=4)
    try:
        firsts, sids = [], []
        for i in range(2):
            sids.append(engine.open_session(f"s{i}"))
            firsts.append(
                Request(
                    tuple(PROMPT[i:]),
                    sp(max_new_tokens=4 + i, temperature=0.0, ignore_eos=True),
                    rid=f"s{i}-a",
                    session=SP(id=f"s{i}"),
                )
            )
        first_outs = engine.generate(firsts, timeout=120)
        engine.pause()  # queue the next three, then admit them together
        seconds = [
            Request(
                tuple(OBSERVATIONS[i]),
                sp(max_new_tokens=6, temperature=0.0, ignore_eos=True),
                rid=f"s{i}-b",
                return_logprob=True,
                session=SP(id=f"s{i}", rid=f"s{i}-a"),
            )
            for i in range(2)
        ]
        fresh = Request(
            tuple(range(60, 75)), sp(max_new_tokens=6, temperature=0.0, ignore_eos=True)
        )
        futures = [engine.submit(r) for r in [*seconds, fresh]]
        time.sleep(0.3)
        before = engine.stats["prefill_batches"]
        engine.resume()
        outs = [f.result(120) for f in futures]
        assert engine.stats["prefill_batches"] == before + 1
    finally:
        engine.shutdown()
    for i in range(2):
        seq = PROMPT[i:] + first_outs[i].output_ids + OBSERVATIONS[i] + outs[i].output_ids
        logits, _ = ref.forward(seq)
        start = len(seq) - len(outs[i].output_ids)
        assert outs[i].output_ids == [int(logits[start - 1 + j].argmax()) for j in range(6)]
        want = torch.log_softmax(logits, -1)
        np.testing.assert_allclose(
            [lp for lp, _ in outs[i].output_token_logprobs],
            [float(want[start - 1 + j, t]) for j, t in enumerate(outs[i].output_ids)],
            atol=1e-4,
        )
    logits, _ = ref.forward(list(range(60, 75)) + outs[2].output_ids)
    assert outs[2].output_ids == [int(logits[14 + j].argmax()) for j in range(6)]


def test_session_branches_offsets_and_replace(tiny_ckpts):
    engine = make_engine(tiny_ckpts["llama"])
    g = sp(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    try:
        sid = engine.open_session()
        a = engine.generate([Request((5, 6, 7), g, rid="a", session=SP(id=sid))])[0]
        ctx_a = [5, 6, 7, *a.output_ids]
        # Two branches from "a": each sees a's context; the second re-prefills (the kept
        # cache is the first branch's) and still matches.
        b = engine.generate([Request((8,), g, rid="b", session=SP(id=sid, rid="a"))])[0]
        c = engine.generate([Request((9,), g, rid="c", session=SP(id=sid, rid="a"))])[0]
        plain = engine.generate([Request((*ctx_a, 9), g)])[0]
        assert b.prompt_tokens == c.prompt_tokens == len(ctx_a) + 1
        assert c.output_ids == plain.output_ids
        # offset: the first 2 tokens of a's context, then the new ones
        d = engine.generate([Request((11, 12), g, rid="d", session=SP(id=sid, rid="a", offset=2))])
        assert d[0].prompt_tokens == 4
        # drop_previous_output: a's prompt only
        e = engine.generate(
            [Request((13,), g, rid="e", session=SP(id=sid, rid="a", drop_previous_output=True))]
        )
        assert e[0].prompt_tokens == 4
        # replace: the requests that continued "a" are gone
        engine.generate([Request((14,), g, rid="f", session=SP(id=sid, rid="a", replace=True))])
        with pytest.raises(RequestError, match="Invalid request session id"):
            engine.generate([Request((1,), g, rid="x", session=SP(id=sid, rid="b"))])
        # BOS of an appended turn is dropped, as SGLang does
        bos = engine.tokenizer.bos_token_id
        if bos is not None:
            h = engine.generate([Request((bos, 15), g, rid="h", session=SP(id=sid, rid="a"))])
            assert h[0].prompt_tokens == len(ctx_a) + 1
    finally:
        engine.shutdown()


def test_session_errors_capacity_and_timeout(tiny_ckpts):
    engine = make_engine(tiny_ckpts["llama"], max_sessions=2, session_timeout_s=None)
    g = sp(max_new_tokens=2, temperature=0.0)
    try:
        with pytest.raises(RequestError, match="session id nope does not exist"):
            engine.generate([Request((5, 6), g, session=SP(id="nope"))])
        sid = engine.open_session("one")
        assert sid == "one"
        with pytest.raises(RequestError, match="same id is still open"):
            engine.open_session("one")
        engine.generate([Request((5, 6), g, rid="r1", session=SP(id=sid))])
        with pytest.raises(RequestError, match="rid 'zz' is not a request of session one"):
            engine.generate([Request((7,), g, rid="r2", session=SP(id=sid, rid="zz"))])
        with pytest.raises(RequestError, match="already a request of session"):
            engine.generate([Request((7,), g, rid="r1", session=SP(id=sid, rid="r1"))])
        with pytest.raises(RequestError, match="n=1"):
            engine.submit(Request((7,), sp(n=2), session=SP(id=sid, rid="r1")))
        with pytest.raises(RequestError, match="context length"):
            engine.generate(
                [Request((7,) * engine.context_len, g, rid="r3", session=SP(id=sid, rid="r1"))]
            )
        short = engine.open_session(timeout=1.0)
        with pytest.raises(RequestError, match="max_sessions=2"):
            engine.open_session()
        assert engine.close_session(sid) and not engine.close_session(sid)
        assert engine.num_sessions == 1
        with pytest.raises(RequestError, match="session id one does not exist"):
            engine.generate([Request((7,), g, rid="r4", session=SP(id=sid, rid="r1"))])
        # the idle timeout closes the other one
        deadline = time.monotonic() + 10
        while engine.num_sessions and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine.num_sessions == 0
        with pytest.raises(RequestError, match=f"session id {short} does not exist"):
            engine.generate([Request((7,), g, session=SP(id=short))])
        with pytest.raises(RequestError, match="streaming sessions are not supported"):
            engine.open_session(streaming=True)
        with pytest.raises(RequestError, match="unknown session_params"):
            SP.from_dict({"id": "x", "ridd": "y"})
    finally:
        engine.shutdown()
