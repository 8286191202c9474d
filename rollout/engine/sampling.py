"""Token sampling, reported log-probs and stop checks of the embedded engine.

Log-probs (matching SGLang's defaults, ``srt/layers/sampler.py`` and the logits processor):
  * output tokens: log-probs under the temperature-scaled distribution ``softmax(z / T)``,
    before top-k/top-p/min-p truncation; greedy requests (temperature 0) report the raw
    ``log_softmax(z)``. With ``return_original_logprob=True`` (SGLang's env var
    ``SGLANG_RETURN_ORIGINAL_LOGPROB``) every output log-prob is the raw ``log_softmax(z)``.
  * input (prompt) tokens: always the raw ``log_softmax(z)``, never temperature-scaled. This
    is what teacher scoring reads (prefill-only: ``max_new_tokens=0``).

Sampling draws one uniform ``u`` per row and token and takes the first token whose running
probability sum exceeds ``u`` (inverse CDF over the vocabulary in id order, after the row's own
truncation), which samples exactly from ``p``. A request with ``sampling_seed`` draws its
``u`` from its own ``torch.Generator`` (seeded from the seed and the index of the parallel
sample, so ``n`` copies differ): its tokens do not depend on what else shares its batch, so
the same request and seed give the same tokens alone or in a crowd. Unseeded requests draw
from the engine's generator (``random_seed``), one call for the whole batch.

Shape legend: B rows of the batch, N picked positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rollout.engine.requests import LogprobEntry
from rollout.engine.slots import BatchParams, Seq

__all__ = [
    "Sampler",
    "check_stops",
    "inverse_cdf",
    "record_top",
    "seed_generator",
    "top_entries",
    "truncate",
]


def seed_generator(seed: int, copy_index: int, device: torch.device) -> torch.Generator:
    """The generator of one seeded request: parallel samples (``copy_index``) differ."""
    seed = (seed * 1_000_003 + copy_index) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    """Draws the next token of every row. ``gen`` serves the unseeded rows (one call per
    step for the whole batch); ``return_original_logprob`` reports raw log-probs."""

    def __init__(
        self, gen: torch.Generator, device: torch.device, return_original_logprob: bool
    ) -> None:
        self.gen = gen
        self.device = device
        self.return_original_logprob = return_original_logprob

    def sample(
        self, logits_BV: torch.Tensor, params: BatchParams
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw one token per row; returns tokens [B], their reported log-probs [B] and the
        reported log-prob rows [B, V] (see the module doc for which distribution)."""
        scaled_BV = logits_BV if params.temp_B is None else logits_BV / params.temp_B[:, None]
        logp_BV = torch.log_softmax(scaled_BV, dim=-1)
        if params.all_greedy:
            tokens_B = torch.argmax(logits_BV, dim=-1)
        else:
            probs_BV = logp_BV.exp()
            u_B = torch.rand(
                logits_BV.shape[0], generator=self.gen, device=self.device, dtype=probs_BV.dtype
            )
            if params.seeded_rows is not None:
                u_B[params.seeded_rows] = torch.cat(
                    [torch.rand(1, generator=g, device=self.device) for g in params.seeded_gens]
                )
            if params.trunc is not None:
                rows_B, *limits = params.trunc
                probs_BV = torch.where(rows_B[:, None], truncate(probs_BV, *limits), probs_BV)
            tokens_B = inverse_cdf(probs_BV, u_B)
            if params.greedy_B is not None:
                tokens_B = torch.where(params.greedy_B, torch.argmax(logits_BV, dim=-1), tokens_B)
        report_BV = logp_BV
        if self.return_original_logprob and params.temp_B is not None:
            report_BV = torch.log_softmax(logits_BV, dim=-1)
        token_lp_B = report_BV.gather(1, tokens_B[:, None])[:, 0]
        return tokens_B, token_lp_B, report_BV


def inverse_cdf(weights_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row's (unnormalised, non-negative) weights, given u ~ U[0, 1).

    The first index whose running sum exceeds ``u * total``; the target is kept strictly
    below the total, so an index with zero weight is never returned.
    """
    cum_BV = weights_BV.cumsum(dim=-1)
    total_B1 = cum_BV[:, -1:]
    target_B1 = torch.minimum(
        u_B[:, None] * total_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1))
    )
    return torch.searchsorted(cum_BV, target_B1, right=True)[:, 0]


def truncate(
    probs_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor, min_p_B: torch.Tensor
) -> torch.Tensor:
    """Zero the tokens top-k / top-p / min-p exclude (SGLang's torch sampling fallback)."""
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    cum_BV = sorted_BV.cumsum(dim=-1)
    rank_V = torch.arange(probs_BV.shape[1], device=probs_BV.device)
    drop_BV = (cum_BV - sorted_BV) > top_p_B[:, None]
    drop_BV |= rank_V[None, :] >= top_k_B[:, None]
    drop_BV |= sorted_BV < (sorted_BV[:, :1] * min_p_B[:, None])
    drop_BV[:, 0] = False  # the most likely token always stays
    kept_BV = sorted_BV.masked_fill(drop_BV, 0.0)
    return torch.zeros_like(probs_BV).scatter_(1, order_BV, kept_BV)


def top_entries(logp_NV: torch.Tensor, k: int) -> list[list[LogprobEntry]]:
    """The ``k`` most likely ``(logprob, token_id)`` pairs of every row, best first."""
    if logp_NV.shape[0] == 0:
        return []
    vals, idx = logp_NV.topk(min(k, logp_NV.shape[1]), dim=-1)
    return [list(zip(v, i, strict=True)) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]


def record_top(params: BatchParams, report_BV: torch.Tensor) -> None:
    """Append this step's top log-probs to the rows that asked for them."""
    for b, seq in params.top_rows:
        if seq.limit == 0:  # prefill-only: no output token
            continue
        seq.out_top.append(top_entries(report_BV[b : b + 1], seq.req.top_logprobs_num)[0])


def check_stops(
    seqs: Sequence[Seq], params: BatchParams, tokens_B: torch.Tensor, tokenizer: Any
) -> bool:
    """Mark rows whose new token is a stop token or completes a stop string; True if any."""
    finished = False
    if params.stop_BM is not None:
        hit_B = (tokens_B[:, None] == params.stop_BM).any(dim=1)
        if bool(hit_B.any()):
            for b in hit_B.nonzero()[:, 0].tolist():
                if seqs[b].finish is None:
                    seqs[b].finish = {"type": "stop", "matched": int(tokens_B[b])}
                    finished = True
    if params.text_rows:
        rows = torch.tensor([b for b, _ in params.text_rows], device=tokens_B.device)
        for (_, seq), token in zip(params.text_rows, tokens_B[rows].tolist(), strict=True):
            seq.text_ids.append(token)
            if seq.finish is None:
                tail = tokenizer.decode(seq.text_ids[-(seq.stop_tail + 1) :])
                for stop in seq.req.sampling.stop:
                    if stop and stop in tail:
                        seq.finish = {"type": "stop", "matched": stop}
                        finished = True
                        break
    return finished
