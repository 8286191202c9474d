"""The generate request of one sample, and one generate output as a rollout sample (what the
producer and the evaluation send and keep)."""

from __future__ import annotations

from mopd.config import RunConfig
from mopd.inference.protocol import GenerateOutput, GenerateRequest, SamplingParams
from mopd.inference.samples import to_rollout_sample
from mopd.models.moe import MoELayout
from mopd.scheduler.sources import derive_seed
from mopd.types import Prompt, RolloutSample

from .errors import RunError

__all__ = ["generate_request", "to_sample"]


def generate_request(
    cfg: RunConfig,
    prompt: Prompt,
    sample_id: str,
    version: int,
    *,
    routes: bool,
    greedy: bool = False,
) -> GenerateRequest:
    """The request of sample ``sample_id`` of ``prompt`` at policy ``version``: the rollout
    sampling config (the source's temperature and length when it sets them; temperature 0
    when ``greedy``), log-probs, and routed experts when ``routes``."""
    s = cfg.rollout.sampling
    temperature = (
        0.0 if greedy else (prompt.temperature if prompt.temperature is not None else s.temperature)
    )
    rid = f"{sample_id}@v{version}"
    params = SamplingParams(
        max_new_tokens=prompt.max_new_tokens or s.max_new_tokens,
        temperature=temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop=tuple(s.stop) or None,
        # Each request draws from its own seed (run seed, request id): the same samples
        # whatever the engine batches it with, so a seeded run reproduces.
        sampling_seed=derive_seed(cfg.run.seed, rid) % 2**31,
    )
    return GenerateRequest(
        input_ids=tuple(int(t) for t in prompt.input_ids_P),
        sampling_params=params,
        rid=rid,
        return_logprob=True,
        return_routed_experts=routes,
    )


def to_sample(
    prompt: Prompt, sample_id: str, out: GenerateOutput, version: int, layout: MoELayout | None
) -> RolloutSample:
    """``mopd.inference.samples.to_rollout_sample``; a server without log-probs ends the run."""
    if out.output_logprobs is None:
        raise RunError(f"rollout server returned no log-probs for {sample_id}")
    return to_rollout_sample(prompt, sample_id, out, version, layout)
