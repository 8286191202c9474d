"""Single-turn verifiers: exact answers, math equivalence, and reasoning-gym's own scorers.

Every function follows ``envs.base.RewardFn``: ``(response, answer, metadata) -> float``.

- ``exact_match``: 1.0 when the response equals the reference answer after normalising
  whitespace (runs of whitespace become one space, ends stripped); ``ignore_case`` also
  folds case. A response of the form ``... <answer>X</answer>`` is judged on ``X``.
- ``math_equivalence``: HuggingFace's ``math-verify`` extracts the final answer of the
  response (the last ``\\boxed{...}``, else the last LaTeX or plain expression / number) and
  decides symbolic equivalence with the reference through SymPy (``1/2`` == ``0.5`` ==
  ``\\frac{1}{2}``, ``2\\sqrt{2}`` == ``\\sqrt{8}``). SymPy can take unbounded time on
  adversarial expressions: in the main thread math-verify's own alarm-based timeout bounds
  each step; everywhere the RewardWorker's per-call timeout bounds the whole call.
- ``reasoning_gym_score`` (registered as ``reasoning_gym``): the task's own
  ``score_answer`` on the entry the generator source stored in
  ``metadata["reasoning_gym"]``, so partial credit and task-specific parsing are
  reasoning-gym's, not ours.

A verifier that cannot score a prompt (no reference answer, metadata from another source
kind) raises ``ValueError`` saying what the prompt lacks; the worker counts it as a
``reward_error``.

Heavy dependencies (math-verify, SymPy, reasoning-gym) are imported on first use so that
importing this module stays cheap; ``warm_up`` imports them ahead of time in worker processes.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

__all__ = [
    "exact_match",
    "extract_tagged_answer",
    "math_equivalence",
    "reasoning_gym_score",
    "warm_up",
]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _require_answer(answer: str | None, reward: str) -> str:
    if answer is None:
        raise ValueError(
            f"{reward} needs a reference answer but the prompt has none; add 'answer' to the "
            "source's records or pick a reward that needs no reference"
        )
    return str(answer)


def extract_tagged_answer(response: str) -> str:
    """The text inside the last ``<answer>...</answer>`` of the response, else the response."""
    found = _ANSWER_TAG.findall(response)
    return found[-1] if found else response


def _normalise(text: str, ignore_case: bool) -> str:
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


def exact_match(
    response: str,
    answer: str | None,
    metadata: Mapping[str, Any] | None = None,
    *,
    ignore_case: bool = False,
) -> float:
    """1.0 if the (tag-extracted) response equals the answer after whitespace normalisation."""
    del metadata
    reference = _require_answer(answer, "exact_match")
    got = _normalise(extract_tagged_answer(response), ignore_case)
    return 1.0 if got == _normalise(reference, ignore_case) else 0.0


def math_equivalence(
    response: str,
    answer: str | None,
    metadata: Mapping[str, Any] | None = None,
    *,
    timeout_s: int = 5,
) -> float:
    """1.0 if the response's final answer is mathematically equivalent to the reference."""
    del metadata
    from math_verify import parse, verify

    reference = _require_answer(answer, "math_equivalence")
    # math-verify's timeout uses SIGALRM, which only the main thread may set.
    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    gold = parse(reference, parsing_timeout=timeout)
    if not gold and "$" not in reference:
        # A bare LaTeX reference ('\sqrt{8}') is only recognised inside math delimiters.
        gold = parse(f"${reference}$", parsing_timeout=timeout)
    if not gold:
        raise ValueError(
            f"math_equivalence cannot parse the reference answer {reference!r}; store it as a "
            "number, an expression or LaTeX"
        )
    predicted = parse(response, parsing_timeout=timeout)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=timeout) else 0.0


@lru_cache(maxsize=64)
def _rg_dataset(name: str, config_json: str) -> Any:
    import reasoning_gym

    # Only score_answer is used; the size and seed of this instance do not matter.
    return reasoning_gym.create_dataset(name, size=1, seed=0, **json.loads(config_json))


def reasoning_gym_score(
    response: str, answer: str | None, metadata: Mapping[str, Any] | None = None
) -> float:
    """reasoning-gym's ``score_answer`` of the task on the entry stored by a generator source."""
    del answer  # the entry holds the reference, and the scorer may use more than the answer
    info = (metadata or {}).get("reasoning_gym")
    if not isinstance(info, Mapping) or "dataset" not in info or "entry" not in info:
        raise ValueError(
            "the reasoning_gym reward needs metadata['reasoning_gym'] = {dataset, config, entry}"
            ", which generator sources write; this prompt has none: use it with kind=generator"
        )
    dataset = _rg_dataset(
        str(info["dataset"]), json.dumps(info.get("config") or {}, sort_keys=True)
    )
    got = extract_tagged_answer(response).strip()
    return float(dataset.score_answer(got, dict(info["entry"])))


def warm_up() -> None:
    """Import the heavy verifier dependencies now (worker start-up), not inside a timed call."""
    import math_verify  # noqa: F401
    import reasoning_gym  # noqa: F401
