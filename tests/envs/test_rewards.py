"""Verifiers on real data: exact answers, math equivalence, and reasoning-gym's own scorers on
items generated offline with ``reasoning_gym.create_dataset``; the registry's lookup errors."""

from __future__ import annotations

import pytest
import reasoning_gym

from envs.base import RewardFn
from envs.registry import REWARDS, UnknownRewardError, get_reward
from envs.rewards import exact_match, math_equivalence, reasoning_gym_score
from mopd.scheduler.sources import GeneratorSource


def test_exact_match_normalises_whitespace_and_optionally_case():
    assert exact_match("  -37 \n", "-37", {}) == 1.0
    assert exact_match("New   York", "new york", {}) == 0.0
    assert exact_match("New   York", "new york", {}, ignore_case=True) == 1.0
    assert REWARDS["exact_match_nocase"]("NOEN", "noen", {}) == 1.0
    assert exact_match("I think <answer> 42 </answer>", "42", {}) == 1.0
    assert exact_match("-37", "-3", {}) == 0.0
    with pytest.raises(ValueError, match="needs a reference answer"):
        exact_match("x", None, {})


@pytest.mark.parametrize(
    ("response", "answer", "reward"),
    [
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("Adding them gives 3/4 of the cake, i.e. 0.75", "3/4", 1.0),
        ("The total is 1,000 dollars.", "1000", 1.0),
        ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
        ("The result is 42.", "41", 0.0),
        ("first 12, finally \\boxed{7}", "12", 0.0),  # the boxed answer wins, not any number
        ("I do not know", "5", 0.0),
        ("", "5", 0.0),
    ],
)
def test_math_equivalence(response, answer, reward):
    assert math_equivalence(response, answer, {}) == reward


def test_math_equivalence_rejects_an_unparsable_reference():
    with pytest.raises(ValueError, match="cannot parse the reference answer"):
        math_equivalence("1", " ", {})


@pytest.mark.parametrize(
    ("task", "config"),
    [
        ("chain_sum", {"min_terms": 2, "max_terms": 3}),
        ("spell_backward", {"min_word_len": 4, "max_word_len": 8}),
        ("basic_arithmetic", {}),
        ("word_sorting", {}),
    ],
)
def test_reasoning_gym_reward_is_the_tasks_own_scorer(task, config):
    dataset = reasoning_gym.create_dataset(task, size=20, seed=11, **config)
    for entry in dataset:
        meta = {"reasoning_gym": {"dataset": task, "config": config, "entry": entry}}
        answer = entry["answer"]
        assert reasoning_gym_score(answer, answer, meta) == 1.0
        assert reasoning_gym_score(f"<answer>{answer}</answer>", answer, meta) == 1.0
        wrong = answer + " 0"
        assert reasoning_gym_score(wrong, answer, meta) == dataset.score_answer(wrong, entry)
        assert reasoning_gym_score(wrong, answer, meta) < 1.0


def test_reasoning_gym_reward_on_compact_generator_items():
    args = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "format": "compact"}
    src = GeneratorSource("sum", "chain_sum", args, seed=0)
    for item in (src.next_item() for _ in range(50)):
        assert reasoning_gym_score(item.answer, item.answer, item.metadata) == 1.0
        assert reasoning_gym_score(str(int(item.answer) + 1), item.answer, item.metadata) == 0.0
    with pytest.raises(ValueError, match="needs metadata\\['reasoning_gym'\\]"):
        reasoning_gym_score("1", "1", {"other": 1})


def test_registry_lookup():
    for name, fn in REWARDS.items():
        assert isinstance(fn, RewardFn) and get_reward(name) is fn
    with pytest.raises(UnknownRewardError, match="unknown reward 'code_tests'; accepted") as err:
        get_reward("code_tests")
    for name in REWARDS:
        assert name in str(err.value)
