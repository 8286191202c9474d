"""One generate output -> the arrays of a ``RolloutSample`` (shared by the run's rollout and
the agentic Tool Manager, so both record token versions and routes the same way).

Shape suffixes: N generated tokens, S = P + N - 1 route rows, L MoE layers, k experts.
"""

from __future__ import annotations

import contextlib

import numpy as np

from mopd.inference.protocol import GenerateOutput, compact_routes
from mopd.models.moe import MoELayout
from mopd.types import Prompt, RolloutSample

__all__ = ["output_routes", "to_rollout_sample", "token_versions"]


def token_versions(out: GenerateOutput, version: int) -> np.ndarray:
    """int32 [N]: the weights version of each generated token. ``version`` unless the output's
    ``weight_version_spans`` say otherwise (partial rollouts: tokens of several versions);
    spans with a non-integer version keep ``version``."""
    versions_N = np.full(len(out.output_ids), version, dtype=np.int32)
    for span in out.weight_version_spans:
        with contextlib.suppress(ValueError):
            versions_N[span.start : span.end] = int(span.version)
    return versions_N


def output_routes(out: GenerateOutput, layout: MoELayout | None) -> np.ndarray | None:
    """uint8/uint16 [S, L_moe, k]: the routed experts of the output's MoE layers (None when
    the server sent none, or the model is dense)."""
    if out.routed_experts is None or layout is None:
        return None
    return compact_routes(out.routed_experts, layout.moe_layer_ids, layout.num_experts)


def to_rollout_sample(
    prompt: Prompt,
    sample_id: str,
    out: GenerateOutput,
    version: int,
    layout: MoELayout | None,
) -> RolloutSample:
    """A single-turn rollout sample of ``prompt`` from one generate output made by weights
    ``version``; a ValueError naming the sample when the server returned no log-probs."""
    if out.output_logprobs is None:
        raise ValueError(f"rollout server returned no log-probs for {sample_id}")
    return RolloutSample(
        sample_id=sample_id,
        prompt=prompt,
        response_ids_T=np.asarray(out.output_ids, dtype=np.int32),
        logp_rollout_T=out.output_logprobs,
        versions_T=token_versions(out, version),
        finish_reason=out.finish_reason.type if out.finish_reason else "stop",
        routes_SLk=output_routes(out, layout),
        text=out.text or "",
    )
