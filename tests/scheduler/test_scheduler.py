"""The DataScheduler: hand-out by weight and priority, back-pressure, too-long prompts,
dynamic sampling, group advantages, staleness admission, the partial cap, and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers

from mopd.algo.advantages import group_advantages
from mopd.config.schema import DataSourceConfig, RunConfig, SchedulerConfig
from mopd.scheduler.scheduler import DataScheduler, PromptGroup, SchedulerError, is_partial
from mopd.scheduler.tokenize import hf_tokenize
from mopd.types import Prompt, RolloutSample, ScoredSample

SUM_ARGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "format": "compact"}
REV_ARGS = {"min_word_len": 3, "max_word_len": 5, "format": "compact"}


def _byte_tokenizer() -> Tokenizer:
    """A real byte-level tokenizer (one token per UTF-8 byte), built offline."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tok


_TOK = _byte_tokenizer()


def tokenize(text: str) -> list[int]:
    return _TOK.encode(text).ids


def sum_source(**kw) -> DataSourceConfig:
    fields = dict(
        name="sum", domain="arith", generator="chain_sum", generator_args=SUM_ARGS, group_size=4
    )
    return DataSourceConfig(**{**fields, **kw})


def rev_source(**kw) -> DataSourceConfig:
    fields = dict(
        name="rev",
        domain="spell",
        generator="spell_backward",
        generator_args=REV_ARGS,
        group_size=4,
    )
    return DataSourceConfig(**{**fields, **kw})


def make(sources, seed: int = 0, **sched) -> DataScheduler:
    return DataScheduler(
        sources, SchedulerConfig(**sched), tokenize=tokenize, seed=seed, advantage="grpo"
    )


def rollout(group: PromptGroup, versions=(0, 0, 0)) -> list[RolloutSample]:
    t = len(versions)
    return [
        RolloutSample(
            sample_id=sid,
            prompt=group.prompt,
            response_ids_T=np.arange(t),
            logp_rollout_T=np.zeros(t),
            versions_T=np.asarray(versions),
            finish_reason="stop",
        )
        for sid in group.sample_ids()
    ]


def signal(group: PromptGroup) -> list[float]:
    return [1.0] + [0.0] * (group.group_size - 1)


def drain(sched: DataScheduler, n: int) -> list[PromptGroup]:
    """Hand out n groups one by one, completing and consuming each (an idle pipeline)."""
    out = []
    for _ in range(n):
        (group,) = sched.next_groups(1)
        scored = sched.complete_group(rollout(group), signal(group))
        sched.mark_consumed(s.sample.sample_id for s in scored)
        out.append(group)
    return out


def test_groups_carry_tokens_and_source_overrides():
    sched = make([sum_source(temperature=0.7, max_response_tokens=6), rev_source()])
    groups = sched.next_groups(6)
    assert len(groups) == 6 and len({g.group_id for g in groups}) == 6
    for g in groups:
        p = g.prompt
        assert p.input_ids_P.tolist() == tokenize(p.text)
        assert g.group_size == 4 and g.version == 0
        assert g.sample_ids() == [f"{g.group_id}#{i}" for i in range(4)]
        if p.source == "sum":
            assert (p.domain, p.temperature, p.max_new_tokens) == ("arith", 0.7, 6)
            assert p.text.endswith("=") and p.answer is not None
        else:
            assert (p.domain, p.temperature, p.max_new_tokens) == ("spell", None, None)
            assert p.text.startswith("rev:")
        assert p.metadata["reasoning_gym"]["entry"]["answer"] == p.answer


def test_inflight_cap_counts_groups_until_the_trainer_consumes_them():
    sched = make([sum_source()], max_inflight_groups=3)
    groups = sched.next_groups(10)
    assert len(groups) == 3 and sched.next_groups(1) == []
    scored = sched.complete_group(rollout(groups[0]), signal(groups[0]))
    assert sched.next_groups(1) == []  # accepted, but still waiting for the trainer
    selection = sched.select_batch(scored[:2], current_version=0)
    assert len(selection.batch) == 2 and sched.next_groups(1) == []  # half the group left
    sched.select_batch(scored[2:], current_version=0)
    assert len(sched.next_groups(5)) == 1
    dropped = sched.complete_group(rollout(groups[1]), [0.0] * 4)  # no signal: slot freed now
    assert dropped == [] and len(sched.next_groups(5)) == 1
    m = sched.metrics()
    assert m["scheduler/inflight"] == 3 and m["scheduler/awaiting_train"] == 0


def test_weights_fix_the_mix_and_the_seed_fixes_the_order():
    sched = make([sum_source(weight=3.0), rev_source(weight=1.0)], seed=0)
    sources = [g.prompt.source for g in drain(sched, 400)]
    for n in range(1, 401):  # every prefix is within one group of the 3:1 share
        assert abs(sources[:n].count("sum") - 0.75 * n) <= 1.0
    same = [g.prompt.source for g in drain(make([sum_source(weight=3.0), rev_source()]), 400)]
    other = [
        g.prompt.source for g in drain(make([sum_source(weight=3.0), rev_source()], seed=1), 400)
    ]
    assert same == sources and other != sources
    m = sched.metrics()
    assert m["scheduler/source/sum/handed_out"] == 300 and m["scheduler/domain/spell/fresh"] == 100


def test_higher_priority_goes_first_when_both_have_work():
    sched = make([sum_source(), rev_source(priority=1)], max_inflight_groups=64)
    sources = [g.prompt.source for g in sched.next_groups(10)]
    assert sources == ["rev", "sum"] * 5  # equal weights; priority orders each round
    # Replacements owed to both: the high-priority source's comes first.
    by_source = {}
    for g in sched.next_groups(4):
        by_source.setdefault(g.prompt.source, g)
    for g in by_source.values():
        assert sched.complete_group(rollout(g), [1.0] * 4) == []
    assert [g.prompt.source for g in sched.next_groups(2)] == ["rev", "sum"]
    assert sched.metrics()["scheduler/source/rev/replacements"] == 1


def test_too_long_prompts_are_skipped_and_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    texts = ["short a", "short b", "x" * 40, "short c", "y" * 41, "short d"]
    path.write_text("\n".join(json.dumps({"prompt": t}) for t in texts))
    src = DataSourceConfig(name="f", domain="d", kind="jsonl", path=str(path), max_prompt_tokens=10)
    sched = make([src], max_inflight_groups=100)
    handed = [g.prompt.text for g in sched.next_groups(8)]  # two epochs of short prompts
    assert sorted(handed) == sorted(["short a", "short b", "short c", "short d"] * 2)
    assert 2 <= sched.metrics()["scheduler/source/f/skipped_too_long"] <= 4
    tight = DataSourceConfig(
        name="f", domain="d", kind="jsonl", path=str(path), max_prompt_tokens=3
    )
    with pytest.raises(SchedulerError, match="longer than max_prompt_tokens=3"):
        make([tight]).next_groups(1)


def test_dynamic_sampling_drops_no_signal_groups_and_replaces_them():
    sched = make([sum_source(weight=1.0), rev_source(weight=20.0)], max_inflight_groups=200)
    groups = sched.next_groups(100)
    sums = [g for g in groups if g.prompt.source == "sum"]
    assert len(sums) >= 4  # within one group of 100 / 21
    assert sched.complete_group(rollout(sums[0]), [1.0, 1.0, 1.0, 1.0]) == []
    assert sched.complete_group(rollout(sums[1]), [0.0] * 4) == []
    assert len(sched.complete_group(rollout(sums[2]), signal(sums[2]))) == 4
    # The next two groups are the replacements for 'sum', although 'rev' holds 95% weight.
    replacements = sched.next_groups(2)
    assert [g.prompt.source for g in replacements] == ["sum", "sum"]
    m = sched.metrics()
    assert m["scheduler/source/sum/dropped_no_signal"] == 2
    assert m["scheduler/source/sum/accepted"] == 1 and m["scheduler/source/sum/completed"] == 3
    assert m["scheduler/source/sum/replacements"] == 2 and m["scheduler/replacements_owed"] == 0
    assert m["scheduler/source/sum/fresh"] == len(sums)  # replacements do not eat the share
    # Without dynamic sampling the same group trains, with zero advantages.
    keep = make([sum_source(dynamic_sampling=False)])
    g = keep.next_groups(1)[0]
    scored = keep.complete_group(rollout(g), [1.0] * 4)
    assert [s.advantage for s in scored] == [0.0] * 4
    # With a dense signal (MOPD's teacher term) equal rewards still teach: kept, zero ORM
    # advantage, no replacement owed.
    dense = DataScheduler(
        [sum_source()], SchedulerConfig(), tokenize=tokenize, seed=0, dense_signal=True
    )
    g = dense.next_groups(1)[0]
    assert [s.advantage for s in dense.complete_group(rollout(g), [1.0] * 4)] == [0.0] * 4
    m = dense.metrics()
    assert m["scheduler/source/sum/dropped_no_signal"] == 0
    assert m["scheduler/replacements_owed"] == 0
    # A group of one sample is never "no signal" (it has no baseline at all).
    single = make([sum_source(group_size=1)])
    g = single.next_groups(1)[0]
    assert len(single.complete_group(rollout(g), [1.0])) == 1


@pytest.mark.parametrize("method", ["grpo", "drgrpo", "rloo"])
def test_advantages_are_group_advantages(method):
    sched = DataScheduler(
        [sum_source(group_size=5)],
        SchedulerConfig(),
        tokenize=tokenize,
        seed=0,
        advantage=method,
        advantage_eps=1e-4,
    )
    group = sched.next_groups(1)[0]
    rewards = [0.25, 1.0, 0.0, 0.5, 0.75]
    scored = sched.complete_group(rollout(group), rewards)
    expected = group_advantages(torch.tensor([rewards]), method=method, eps=1e-4)[0]
    assert [s.reward for s in scored] == rewards
    assert [s.sample.sample_id for s in scored] == group.sample_ids()
    torch.testing.assert_close(torch.tensor([s.advantage for s in scored]), expected)
    assert all(s.logp_teacher_T is None for s in scored)
    assert sched.pass_rate(group.item_key) == pytest.approx(0.5)


def test_complete_group_rejects_misuse():
    sched = make([sum_source()])
    a, b = sched.next_groups(2)
    with pytest.raises(SchedulerError, match="size 4; got 3 samples"):
        sched.complete_group(rollout(a)[:3], [1, 0, 0])
    with pytest.raises(SchedulerError, match="several groups"):
        sched.complete_group(rollout(a)[:2] + rollout(b)[:2], [1, 0, 0, 1])
    with pytest.raises(SchedulerError, match="must be finite"):
        sched.complete_group(rollout(a), [1, 0, float("nan"), 0])
    sched.complete_group(rollout(a), [1, 0, 0, 0])
    with pytest.raises(SchedulerError, match="not rolling out"):
        sched.complete_group(rollout(a), [1, 0, 0, 0])
    with pytest.raises(SchedulerError, match=r"algorithm\.advantage='ppo'"):
        DataScheduler([sum_source()], SchedulerConfig(), tokenize=tokenize, seed=0, advantage="ppo")


def _scored(versions, sid="s") -> ScoredSample:
    prompt = Prompt(prompt_id="p", source="sum", domain="arith", input_ids_P=np.array([1, 2]))
    t = len(versions)
    sample = RolloutSample(
        sample_id=sid,
        prompt=prompt,
        response_ids_T=np.arange(t),
        logp_rollout_T=np.zeros(t),
        versions_T=np.asarray(versions),
        finish_reason="stop",
    )
    return ScoredSample(sample=sample, reward=1.0, advantage=0.0)


def test_staleness_admission_never_admits_a_sample_staler_than_the_bound():
    rng = np.random.default_rng(0)
    for trial in range(200):
        max_staleness = int(rng.integers(0, 4))
        sched = make([sum_source()], max_staleness=max_staleness, max_partial_fraction=1.0)
        current = int(rng.integers(0, 8))
        cands = []
        for i in range(int(rng.integers(1, 12))):
            lo = int(rng.integers(0, current + 1))
            versions = np.sort(rng.integers(lo, current + 1, size=int(rng.integers(1, 6))))
            cands.append(_scored(versions, sid=f"{trial}-{i}"))
        for c in cands:
            oldest = int(c.sample.versions_T.min())
            assert sched.admit(c, current) == (current - oldest <= max_staleness)
        sel = sched.select_batch(cands, current)
        assert all(current - int(s.sample.versions_T.min()) <= max_staleness for s in sel.batch)
        assert all(
            current - int(s.sample.versions_T.min()) > max_staleness for s in sel.dropped_stale
        )
        assert len(sel.batch) + len(sel.dropped_stale) == len(cands) and not sel.waiting
    hist = {k: v for k, v in sched.metrics().items() if k.startswith("scheduler/staleness/")}
    assert hist and all(int(k.rsplit("/", 1)[1]) <= max_staleness for k in hist)
    with pytest.raises(ValueError, match="from the future"):
        sched.admit(_scored([3, 4]), current_version=3)


def test_partial_cap_holds_partial_samples_back():
    full = [_scored([2, 2], sid=f"f{i}") for i in range(10)]
    partial = [_scored([1, 2], sid=f"p{i}") for i in range(10)]
    sched = make([sum_source()], max_staleness=2, max_partial_fraction=0.25)
    sel = sched.select_batch(partial + full, current_version=2)
    assert sel.num_partial == 3 and len(sel.batch) == 13  # 3 <= 0.25 * 13, 4 > 0.25 * 14
    assert sum(is_partial(s) for s in sel.batch) == 3
    assert len(sel.waiting) == 7 and all(is_partial(s) for s in sel.waiting)
    assert sel.num_partial_held == 7
    assert sched.metrics()["scheduler/partial_share"] == pytest.approx(3 / 13)
    rng = np.random.default_rng(1)
    for _ in range(300):  # property: the cap holds and the batch is as large as it allows
        frac = float(rng.choice([0.0, 0.1, 0.3, 0.5, 1.0]))
        nf, npart = int(rng.integers(0, 12)), int(rng.integers(0, 12))
        limit = int(rng.integers(0, 25))
        sched = make([sum_source()], max_staleness=5, max_partial_fraction=frac)
        cands = [_scored([2, 2], sid=f"f{i}") for i in range(nf)]
        cands += [_scored([0, 2], sid=f"p{i}") for i in range(npart)]
        sel = sched.select_batch(cands, current_version=2, max_samples=limit)
        p, n = sel.num_partial, len(sel.batch)
        assert n <= limit and p <= frac * n + 1e-9
        assert n - p == min(nf, limit - p)  # full samples are never held back needlessly
        if p < min(npart, limit):  # one more partial would break the cap
            assert p + 1 > frac * (min(nf, limit - p - 1) + p + 1) + 1e-9
        assert len(sel.batch) + len(sel.waiting) == nf + npart


def test_weight_updates_mark_spanning_groups_and_requeue_redispatches_them():
    sched = make([sum_source()], partial_rollout=True)
    a, b = sched.next_groups(2)
    assert sched.on_weight_update(1) == [a.group_id, b.group_id]
    c = sched.next_groups(1)[0]
    assert c.version == 1 and sched.spanning_groups() == [a.group_id, b.group_id]
    sched.complete_group(rollout(a, versions=(0, 1, 1)), signal(a))
    assert sched.metrics()["scheduler/inflight_spanning"] == 1
    sched.requeue(b.group_id)
    again = sched.next_groups(1)[0]
    assert again.group_id == b.group_id and again.prompt.text == b.prompt.text
    assert again.version == 1 and sched.spanning_groups() == []
    with pytest.raises(SchedulerError, match="went back from 1 to 0"):
        sched.on_weight_update(0)
    with pytest.raises(SchedulerError, match="not rolling out"):
        sched.requeue("sum/999")


def _run_ops(sched: DataScheduler) -> list[PromptGroup]:
    """A mixed history: accepted, dropped, consumed, and groups left in flight."""
    groups = sched.next_groups(6)
    for i, g in enumerate(groups[:4]):
        scored = sched.complete_group(rollout(g), [1.0] * 4 if i == 1 else signal(g))
        if i == 0:
            sched.select_batch(scored, sched.version)
    sched.on_weight_update(1)
    return groups[4:]


def test_state_round_trip_continues_exactly():
    sources = [sum_source(weight=2.0), rev_source(dynamic_sampling=True)]
    a = make(sources, seed=7, max_inflight_groups=12)
    inflight = _run_ops(a)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable, as a checkpoint is

    b = make(sources, seed=7, max_inflight_groups=12)
    b.load_state_dict(state)
    # The uninterrupted run, had its workers died: requeue what was in flight.
    for g in inflight:
        a.requeue(g.group_id)

    def counters(sched):
        return {k: v for k, v in sched.metrics().items() if "requeued" not in k}

    assert counters(b) == counters(a)

    def fingerprint(groups):
        return [(g.group_id, g.prompt.text, g.version, g.item_key) for g in groups]

    cont_a, cont_b = a.next_groups(12), b.next_groups(12)
    assert fingerprint(cont_b) == fingerprint(cont_a)
    assert [g.group_id for g in cont_b[:2]] == [g.group_id for g in inflight]  # re-dispatched first
    for ga, gb in zip(cont_a, cont_b, strict=True):
        sa = a.complete_group(rollout(ga), signal(ga))
        sb = b.complete_group(rollout(gb), signal(gb))
        a.mark_consumed(s.sample.sample_id for s in sa)
        b.mark_consumed(s.sample.sample_id for s in sb)
    assert fingerprint(b.next_groups(12)) == fingerprint(a.next_groups(12))
    with pytest.raises(SchedulerError, match=r"resume with the data\.sources"):
        make([sum_source()]).load_state_dict(state)


def test_eval_prompts_are_disjoint_from_training():
    args = {**SUM_ARGS, "max_digits": 1}
    sched = make([sum_source(generator_args=args, num_eval_prompts=40)], max_inflight_groups=500)
    held = {p.text for p in sched.eval_prompts("sum")}
    assert len(held) > 20
    assert not held & {g.prompt.text for g in sched.next_groups(500)}
    assert all(p.prompt_id.startswith("eval/") for p in sched.eval_prompts())
    with pytest.raises(SchedulerError, match="unknown source 'x'"):
        sched.eval_prompts("x")


def test_built_from_the_run_config_and_an_hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    yaml = """
    model: {path: m}
    data:
      sources:
        - {name: sum, domain: arith, generator: chain_sum, group_size: 2,
           generator_args: {min_terms: 2, max_terms: 2, format: compact}}
    """
    run = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(yaml))
    hf = PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer())
    sched = DataScheduler(
        run.data.sources,
        run.scheduler,
        tokenize=hf_tokenize(hf),
        seed=run.run.seed,
        advantage=run.algorithm.advantage,
    )
    group = sched.next_groups(1)[0]
    assert group.group_size == 2
    assert group.prompt.input_ids_P.tolist() == tokenize(group.prompt.text)
    with pytest.raises(ValueError, match="no chat template"):
        hf_tokenize(hf, chat_template=True)
