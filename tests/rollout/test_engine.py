"""The embedded engine in-process: numbers against plain transformers forwards."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from rollout.engine import Engine, EngineConfig, Request, RequestError, SamplingParams

WINDOW = 8  # the tiny MiMo's sliding window: prompts below are longer


def make_engine(path, **kw) -> Engine:
    kw.setdefault("enable_return_routed_experts", True)
    return Engine(EngineConfig(model_path=str(path), dtype="float32", **kw)).start()


def sp(**kw) -> SamplingParams:
    return SamplingParams.from_dict(kw)


PROMPTS = [
    list(range(40, 62)),  # 22 tokens: past the sliding window
    [70, 71, 72],
    list(range(100, 130, 2)),
    [9] * 12,
]


@pytest.fixture(scope="module")
def mimo(tiny_ckpts):
    engine = make_engine(tiny_ckpts["mimo"], max_running_requests=4)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("arch", ["mimo", "qwen3_moe", "llama"])
def test_logprobs_and_routes_match_a_teacher_forced_forward(arch, tiny_ckpts, reference):
    ref = reference(arch)
    moe = ref.top_k > 0
    engine = make_engine(tiny_ckpts[arch], max_running_requests=8, random_seed=3)
    try:
        reqs = [
            Request(
                tuple(p),
                sp(max_new_tokens=10 + 3 * i, temperature=t, top_p=0.9, ignore_eos=True),
                return_logprob=True,
                logprob_start_len=0,
                return_routed_experts=moe,
            )
            for i, p in enumerate(PROMPTS)
            for t in (0.0, 0.7)
        ]
        outs = engine.generate(reqs, timeout=120)
    finally:
        engine.shutdown()
    for req, out in zip(reqs, outs, strict=True):
        prompt, gen = list(req.input_ids), out.output_ids
        assert len(gen) == req.sampling.max_new_tokens
        logits, routes = ref.forward(prompt + gen)
        temp = 1.0 if req.sampling.greedy else req.sampling.temperature
        logp = torch.log_softmax(logits / temp, dim=-1)
        raw = torch.log_softmax(logits, dim=-1)
        P = len(prompt)
        want_out = [float(logp[P - 1 + i, t]) for i, t in enumerate(gen)]
        got_out = [lp for lp, _ in out.output_token_logprobs]
        np.testing.assert_allclose(got_out, want_out, atol=1e-4)
        assert [t for _, t in out.output_token_logprobs] == gen
        if req.sampling.greedy:
            assert gen == [int(logits[P - 1 + i].argmax()) for i in range(len(gen))]
        # Prompt log-probs are raw (no temperature); SGLang pads the first with None.
        assert out.input_token_logprobs[0] == (None, prompt[0])
        want_in = [float(raw[i - 1, prompt[i]]) for i in range(1, P)]
        np.testing.assert_allclose(
            [lp for lp, _ in out.input_token_logprobs[1:]], want_in, atol=1e-4
        )
        if moe:
            # Every token the model ran forward on: the prompt and all but the last sample.
            assert out.routed_experts.shape == (P + len(gen) - 1, ref.num_layers, ref.top_k)
            np.testing.assert_array_equal(
                np.sort(out.routed_experts, -1), np.sort(routes[:-1].numpy(), -1)
            )
            dense = [i for i in range(ref.num_layers) if not routes[:, i].any()]
            assert dense == [0]  # layer 0 is dense in both tiny MoE models: rows of zeros
        else:
            assert out.routed_experts is None


def test_prefill_only_scoring_by_a_second_model(tiny_ckpts, reference, mimo):
    student = mimo.generate(
        [Request(tuple(PROMPTS[0]), sp(max_new_tokens=12, temperature=1.0, ignore_eos=True))]
    )[0]
    prompt, response = PROMPTS[0], student.output_ids
    teacher = make_engine(tiny_ckpts["mimo_teacher"])
    try:
        scored = teacher.generate(
            [
                Request(
                    tuple(prompt + response),
                    sp(max_new_tokens=0),
                    return_logprob=True,
                    logprob_start_len=len(prompt) - 1,
                )
            ]
        )[0]
    finally:
        teacher.shutdown()
    assert scored.output_ids == [] and scored.finish_reason == {"type": "length", "length": 0}
    entries = scored.input_token_logprobs
    assert entries[0] == (None, prompt[-1])
    assert [t for _, t in entries[1:]] == response  # one log-prob per response token
    logits, _ = reference("mimo_teacher").forward(prompt + response)
    logp = torch.log_softmax(logits, -1)
    want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(response)]
    np.testing.assert_allclose([lp for lp, _ in entries[1:]], want, atol=1e-4)
    # the teacher is another model: its scores differ from the student's own
    assert not np.allclose([lp for lp, _ in entries[1:]], [0.0] * len(want))


def test_continuous_batching_matches_single_requests(mimo):
    reqs = [
        Request(
            tuple(p),
            sp(max_new_tokens=4 + 5 * i, temperature=t, sampling_seed=11 + i, ignore_eos=True),
            rid=f"cb{i}-{t}",
            return_logprob=True,
        )
        for i, p in enumerate([*PROMPTS, [33, 34, 35, 36, 37], list(range(3, 30))])
        for t in (0.0, 0.9)
    ]
    alone = [mimo.generate([r])[0] for r in reqs]
    before = dict(mimo.stats)
    crowd = mimo.generate(reqs, timeout=120)  # 12 requests, 4 slots: admitted as others finish
    assert mimo.stats["prefill_batches"] - before["prefill_batches"] >= 3
    assert mimo.stats["peak_running"] == 4
    for a, c in zip(alone, crowd, strict=True):
        assert c.output_ids == a.output_ids
        np.testing.assert_allclose(
            [x for x, _ in c.output_token_logprobs],
            [x for x, _ in a.output_token_logprobs],
            atol=1e-4,
        )


def test_seeded_sampling_is_reproducible(mimo):
    def run(seed, copy=0):
        params = sp(max_new_tokens=16, temperature=1.0, sampling_seed=seed, ignore_eos=True)
        return mimo.generate([Request(tuple(PROMPTS[1]), params, copy_index=copy)])[0].output_ids

    assert run(5) == run(5)
    assert run(5) != run(6)
    assert run(5, copy=1) != run(5, copy=0)  # parallel samples of one seeded request differ
    # "seed" is accepted as an alias of SGLang's sampling_seed
    assert SamplingParams.from_dict({"seed": 5}) == SamplingParams.from_dict({"sampling_seed": 5})


def _ascii_position(tokenizer, ids, lo=2):
    for pos in range(lo, len(ids)):
        text = tokenizer.decode([ids[pos]])
        if text.isascii() and text.isalnum():
            return pos, text
    return None


def test_stop_token_ids_and_stop_strings(mimo):
    greedy = sp(max_new_tokens=40, temperature=0, ignore_eos=True)
    found = None
    for prompt in PROMPTS:
        ids = mimo.generate([Request(tuple(prompt), greedy)])[0].output_ids
        hit = _ascii_position(mimo.tokenizer, ids)
        if hit:
            found = prompt, ids, *hit
            break
    assert found, "no ASCII token in the greedy outputs"
    prompt, ids, pos, char = found
    first = ids.index(ids[pos])

    stop_id = sp(max_new_tokens=40, temperature=0, stop_token_ids=[ids[pos]])
    out = mimo.generate([Request(tuple(prompt), stop_id)])[0]
    assert out.finish_reason == {"type": "stop", "matched": ids[pos]}
    assert out.output_ids == ids[: first + 1]  # the stop token is kept in output_ids
    ignored = sp(max_new_tokens=40, temperature=0, stop_token_ids=[ids[pos]], ignore_eos=True)
    assert mimo.generate([Request(tuple(prompt), ignored)])[0].output_ids == ids

    stop_str = sp(max_new_tokens=40, temperature=0, stop=[char], ignore_eos=True)
    out = mimo.generate([Request(tuple(prompt), stop_str)])[0]
    assert out.finish_reason == {"type": "stop", "matched": char}
    assert char not in out.text and out.output_ids == ids[: len(out.output_ids)]
    assert mimo.tokenizer.decode(out.output_ids).endswith(char)  # stopped right at the match
    keep = sp(max_new_tokens=40, temperature=0, stop=[char], no_stop_trim=True, ignore_eos=True)
    kept = mimo.generate([Request(tuple(prompt), keep)])[0]
    assert kept.text == out.text + char


def test_abort_running_and_waiting(tiny_ckpts):
    engine = make_engine(tiny_ckpts["mimo"], max_running_requests=1)
    try:
        long = sp(max_new_tokens=400, temperature=1.0, ignore_eos=True)
        running = engine.submit(Request(tuple(PROMPTS[1]), long, rid="job-a_0"))
        waiting = engine.submit(Request(tuple(PROMPTS[2]), long, rid="job-a_1"))
        other = engine.submit(Request(tuple(PROMPTS[3]), sp(max_new_tokens=3), rid="job-b"))
        deadline = time.time() + 60
        while engine.num_generated_tokens < 5 and time.time() < deadline:
            time.sleep(0.01)
        engine.abort("job-a")  # prefix match, as SGLang: both parallel samples
        a, w, b = running.result(60), waiting.result(60), other.result(60)
    finally:
        engine.shutdown()
    assert a.finish_reason["type"] == "abort" and 0 < len(a.output_ids) < 400
    assert w.finish_reason["type"] == "abort" and w.output_ids == []
    assert b.finish_reason["type"] != "abort"


def test_weight_reload_from_disk_and_tensors(tiny_ckpts):
    from transformers import AutoModelForCausalLM

    engine = make_engine(tiny_ckpts["mimo"])
    greedy = Request(tuple(PROMPTS[0]), sp(max_new_tokens=12, temperature=0, ignore_eos=True))
    try:
        base = engine.generate([greedy])[0]
        assert base.weight_version == "default"
        ok, msg = engine.update_weights_from_disk(str(tiny_ckpts["mimo_teacher"]), "step-1")
        assert ok, msg
        swapped = engine.generate([greedy])[0]
        assert swapped.weight_version == "step-1" and swapped.output_ids != base.output_ids
        original = AutoModelForCausalLM.from_pretrained(tiny_ckpts["mimo"], dtype=torch.float32)
        ok, msg = engine.update_weights_from_tensors(original.state_dict().items(), "step-2")
        assert ok, msg
        back = engine.generate([greedy])[0]
        assert back.weight_version == "step-2" and back.output_ids == base.output_ids
        # checkpoint (hub) names, as a trainer exports them for SGLang: per-expert MoE weights
        from transformers.modeling_utils import revert_weight_conversion

        teacher = AutoModelForCausalLM.from_pretrained(
            tiny_ckpts["mimo_teacher"], dtype=torch.float32
        )
        hub = dict(revert_weight_conversion(teacher, dict(teacher.state_dict())))
        assert any(".experts.0." in n for n in hub) and not set(hub) <= set(original.state_dict())
        ok, msg = engine.update_weights_from_tensors(hub.items(), "step-3")
        assert ok, msg
        assert engine.generate([greedy])[0].output_ids == swapped.output_ids
        ok, msg = engine.update_weights_from_tensors([("no.such.weight", torch.zeros(1))], "x")
        assert not ok and "no.such.weight" in msg and engine.weight_version == "step-3"
        ok, msg = engine.update_weights_from_disk(str(tiny_ckpts["qwen3_moe"]), "bad")
        assert not ok and engine.weight_version == "step-3"
        assert engine.update_weights_from_disk("/nonexistent/dir")[0] is False
    finally:
        engine.shutdown()


def test_invalid_requests_name_the_problem(tiny_ckpts, mimo):
    context = mimo.context_len
    with pytest.raises(RequestError, match="longer than the model's context length"):
        mimo.submit(Request(tuple([5] * context)))
    with pytest.raises(RequestError, match="Requested token count exceeds"):
        mimo.submit(Request((5, 6), sp(max_new_tokens=context)))
    with pytest.raises(RequestError, match="vocab size"):
        mimo.submit(Request((5, 100_000)))
    with pytest.raises(RequestError, match="logprob_start_len"):
        mimo.submit(Request((5, 6), return_logprob=True, logprob_start_len=2))
    with pytest.raises(RequestError, match="top_p"):
        sp(top_p=0.0)
    with pytest.raises(RequestError, match="unknown sampling_params"):
        sp(temprature=1.0)
    with pytest.raises(RequestError, match="not supported"):
        sp(repetition_penalty=1.3)
    llama = make_engine(tiny_ckpts["llama"], enable_return_routed_experts=False)
    try:
        with pytest.raises(RequestError, match="--enable-return-routed-experts"):
            llama.submit(Request((5, 6), return_routed_experts=True))
    finally:
        llama.shutdown()


def test_inverse_cdf_sampling_follows_the_weights():
    from rollout.engine.sampling import inverse_cdf

    weights_V = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    gen = torch.Generator().manual_seed(0)
    u_N = torch.rand(200_000, generator=gen)
    picks_N = inverse_cdf(weights_V.expand(len(u_N), -1), u_N)
    freq_V = torch.bincount(picks_N, minlength=6).double() / len(u_N)
    np.testing.assert_allclose(freq_V.numpy(), [0.0, 0.5, 0.0, 0.3, 0.2, 0.0], atol=5e-3)
    # u = 1 stands for a product u * total that rounds up to the total: still never the
    # zero-weight token at the end; u = 0 takes the first token with weight.
    top = torch.tensor([1.0, 0.999999, 0.0])
    picks = inverse_cdf(torch.tensor([[0.1, 0.7, 0.2, 0.0]] * 3), top)
    assert picks.tolist() == [2, 2, 0]


def test_truncated_rows_keep_their_limits_and_leave_neighbours_unchanged(mimo, reference):
    ref = reference("mimo")
    prompt = tuple(PROMPTS[0])
    seeded = Request(
        prompt, sp(max_new_tokens=12, temperature=0.8, sampling_seed=5, ignore_eos=True)
    )
    alone = mimo.generate([seeded])[0].output_ids
    limits = [
        {"top_k": 3},
        {"top_p": 0.5},
        {"min_p": 0.2},
    ]
    truncated = [
        Request(prompt, sp(max_new_tokens=12, temperature=0.8, ignore_eos=True, **kw))
        for kw in limits
    ]
    outs = mimo.generate([*truncated, seeded], timeout=60)
    assert outs[-1].output_ids == alone  # a truncating neighbour changes nothing for it
    for kw, out in zip(limits, outs, strict=False):
        gen = out.output_ids
        logits, _ = ref.forward(list(prompt) + gen)
        probs = torch.softmax(logits[len(prompt) - 1 : -1] / 0.8, dim=-1)
        for i, token in enumerate(gen):
            p = probs[i]
            higher = p[p > p[token]].sum()  # mass of the tokens ranked above it
            if "top_k" in kw:
                assert int((p > p[token]).sum()) < kw["top_k"]
            if "top_p" in kw:
                assert float(higher) <= kw["top_p"] + 1e-5
            if "min_p" in kw:
                assert float(p[token]) >= kw["min_p"] * float(p.max()) - 1e-6


def test_shutdown_lets_the_model_be_collected(tiny_ckpts):
    import gc
    import weakref

    engine = make_engine(tiny_ckpts["mimo"])  # start() freezes the collector's view
    # The routing hooks and the routers form a cycle: only the cycle collector frees them.
    router = weakref.ref(next(iter(engine.capture.routers.values())))
    engine.shutdown()
    del engine
    gc.collect()
    assert router() is None


def test_a_failed_prefill_fails_its_batch_and_the_engine_keeps_serving(tiny_ckpts):
    engine = make_engine(tiny_ckpts["mimo"], max_running_requests=4)
    failures = [RuntimeError("injected prefill failure")]

    def fail_once(_module, _args):
        if failures:
            raise failures.pop()

    hook = engine.base.register_forward_pre_hook(fail_once)
    try:
        batch = [engine.submit(Request(tuple(p), sp(max_new_tokens=3))) for p in PROMPTS[:2]]
        for future in batch:  # taken from the waiting queue, never running: must not hang
            with pytest.raises(RuntimeError, match="injected prefill failure"):
                future.result(30)
        out = engine.generate([Request(tuple(PROMPTS[1]), sp(max_new_tokens=3))], timeout=30)
    finally:
        hook.remove()
        engine.shutdown()
    assert len(out[0].output_ids) == 3 and out[0].finish_reason["type"] == "length"
