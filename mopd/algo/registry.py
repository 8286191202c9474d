"""The one place that maps configuration strings to algorithm functions or accepted options.

Config validation checks option strings against these tables; code that turns a string into
behaviour goes through ``lookup`` so a bad value fails with the accepted keys in the message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mopd.algo import advantages, kl, losses, routing
from mopd.algo.stages import STAGES

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "IS_CORRECTIONS",
    "KL_ESTIMATORS",
    "LOSSES",
    "ROUTER_SCORE_FUNCS",
    "STUDENT_LOGPROB_SOURCES",
    "TEACHER_KL_MODES",
    "lookup",
]

# Group advantage estimators: f(rewards_NG, *, eps) -> adv_NG.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Any]] = dict(advantages.ESTIMATORS)

# Losses per training stage, read from the stage registry (mopd.algo.stages.STAGES, where a
# stage also says what it needs from the run): each returns (loss, metrics).
LOSSES: dict[str, Callable[..., Any]] = {name: st.loss_fn for name, st in STAGES.items()}

# Sample-based KL estimators: f(logp_a, logp_b) -> per-token estimate.
KL_ESTIMATORS: dict[str, Callable[..., Any]] = {
    "k1": kl.kl_k1,
    "k2": kl.kl_k2,
    "k3": kl.kl_k3,
}

AGGREGATIONS: tuple[str, ...] = losses.AGGREGATIONS
IS_CORRECTIONS: tuple[str, ...] = losses.IS_CORRECTIONS
TEACHER_KL_MODES: tuple[str, ...] = losses.TEACHER_KL_MODES
STUDENT_LOGPROB_SOURCES: tuple[str, ...] = losses.STUDENT_LOGPROB_SOURCES
ROUTER_SCORE_FUNCS: tuple[str, ...] = routing.ROUTER_SCORE_FUNCS


def lookup(table_name: str, table: Mapping[str, Any] | tuple[str, ...], key: str) -> Any:
    """Return ``table[key]`` (or ``key`` itself for a tuple of accepted options).

    Raises ValueError naming the table, the bad key and the accepted keys.
    """
    accepted = tuple(table)
    if key not in accepted:
        raise ValueError(
            f"{table_name}: unknown key {key!r}; accepted: {', '.join(map(str, accepted))}"
        )
    return key if isinstance(table, tuple) else table[key]
