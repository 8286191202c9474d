"""The names a run config's strings resolve to outside the config package, for validation.

``data.sources[*].reward`` names an entry of the reward registry (``envs.registry``) and
``data.sources[*].generator`` a reasoning-gym task family whose config fields are the
accepted ``generator_args``. The config package imports no role package (setup.cfg's
import contracts), so the callers that validate a run for real (``mopd validate``,
``mopd train``, ``mopd pipeline`` and the run driver) take these tables from here and hand
them to ``mopd.config.validate``. Both imports are light (no model, no server).
"""

from __future__ import annotations

import dataclasses
from functools import cache

from mopd.config.validate import Registries

__all__ = ["registries"]

# GeneratorSource sets the dataset's size and seed itself; ``format`` picks the prompt form.
_SET_BY_THE_SOURCE = frozenset({"seed", "size"})
_SOURCE_ARGS = frozenset({"format"})


@cache
def registries() -> Registries:
    """The reward names and the generator task families with their accepted arguments."""
    from reasoning_gym.factory import DATASETS

    from envs.registry import REWARDS

    generators = {
        name: frozenset(f.name for f in dataclasses.fields(config_cls)) - _SET_BY_THE_SOURCE
        | _SOURCE_ARGS
        for name, (_, config_cls) in DATASETS.items()
    }
    return Registries(rewards=frozenset(REWARDS), generators=generators)
