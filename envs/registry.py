"""The one map from a data source's ``reward`` string to its reward function.

``DataSourceConfig.reward`` names an entry of ``REWARDS``; ``get_reward`` turns the name into
the function and rejects an unknown name with the list of accepted ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from envs.base import RewardFn
from envs.rewards import exact_match, math_equivalence, reasoning_gym_score

__all__ = ["REWARDS", "UnknownRewardError", "get_reward"]


class UnknownRewardError(LookupError):
    """A reward name that is not in the registry."""


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "exact_match_nocase": partial(exact_match, ignore_case=True),
    "math_equivalence": math_equivalence,
    "reasoning_gym": reasoning_gym_score,
}
"""Reward name (``DataSourceConfig.reward``) -> reward function."""


def get_reward(name: str, rewards: Mapping[str, RewardFn] | None = None) -> RewardFn:
    """The reward function called ``name`` in ``rewards`` (default: ``REWARDS``)."""
    table = REWARDS if rewards is None else rewards
    try:
        return table[name]
    except KeyError:
        raise UnknownRewardError(
            f"unknown reward {name!r}; accepted rewards: {', '.join(sorted(table))} "
            "(set data.sources[*].reward to one of them)"
        ) from None
