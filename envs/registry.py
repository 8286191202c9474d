"""The one map from a data source's ``reward`` string to its reward function.

``DataSourceConfig.reward`` names an entry of ``REWARDS``; ``get_reward`` turns the name into
the function and rejects an unknown name with the list of accepted ones.

``agentic`` marks a source of agentic tasks (``envs.agentic``): its samples are scored by
their environment when the trajectory ends (``envs.tool_manager.ToolManager`` sets
``RolloutSample.reward``), never by the reward worker; its entry here only refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from envs.base import RewardFn
from envs.rewards import exact_match, math_equivalence, reasoning_gym_score

__all__ = ["AGENTIC", "REWARDS", "UnknownRewardError", "agentic_reward", "get_reward"]

AGENTIC = "agentic"
"""The reward name of agentic sources."""


class UnknownRewardError(LookupError):
    """A reward name that is not in the registry."""


def agentic_reward(response: str, answer: str | None, metadata: Mapping[str, Any]) -> float:
    """Refuses: an agentic sample's reward comes from its environment (see the module doc)."""
    del response, answer, metadata
    raise ValueError(
        "the 'agentic' reward is computed by the task's environment when the trajectory "
        "ends (ToolManager sets RolloutSample.reward); the reward worker must not score "
        "agentic samples: route them through envs.tool_manager.ToolManager"
    )


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "exact_match_nocase": partial(exact_match, ignore_case=True),
    "math_equivalence": math_equivalence,
    "reasoning_gym": reasoning_gym_score,
    AGENTIC: agentic_reward,
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
