"""Token log-probabilities and entropies from logits, chunked to bound memory.

With a vocabulary V of ~150k, ``torch.log_softmax(logits_BTV)`` materialises a second [B, T, V]
tensor (in fp32 for bf16 logits, twice the size of the logits) only to read one entry per row.
These functions never hold more than one chunk of rows in fp32: the forward pass gathers the
wanted logits and subtracts a logsumexp computed chunk by chunk; the backward pass rebuilds the
softmax chunk by chunk from the saved logits and the saved logsumexp. The gradient tensor for the
logits ([B, T, V], the logits' dtype) is the only full-size allocation, as it must be.

    log p(token) = logit[token] - logsumexp(logits)
    d/dlogits    = g * (onehot(token) - softmax(logits))
    H            = logsumexp(logits) - sum_v p_v logit_v
    dH/dlogit_v  = p_v * (sum_u p_u logit_u - logit_v)

Shape suffixes: B sequences, T positions, V vocabulary, K ids per position.
"""

from __future__ import annotations

from typing import Any

import torch

from mopd.algo._check import check_tensor

__all__ = [
    "entropy_from_logits",
    "gather_log_softmax",
    "selective_log_softmax",
    "topk_log_softmax",
]

# Elements of one fp32 chunk (256 MiB): large enough to keep kernels busy, small next to V * T.
_CHUNK_ELEMENTS = 1 << 26


def _chunk_rows(V: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        return max(1, _CHUNK_ELEMENTS // max(V, 1))
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows!r} must be a positive int or None")
    return chunk_rows


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: fp32 for bf16/fp16/fp32, fp64 stays fp64."""
    return x if x.dtype == torch.float64 else x.float()


def _row_logsumexp(logits_NV: torch.Tensor, rows: int) -> torch.Tensor:
    acc_dtype = _acc(logits_NV[:0]).dtype
    lse_N = torch.empty(logits_NV.shape[0], dtype=acc_dtype, device=logits_NV.device)
    for s in range(0, logits_NV.shape[0], rows):
        lse_N[s : s + rows] = torch.logsumexp(_acc(logits_NV[s : s + rows]), dim=-1)
    return lse_N


class _GatherLogSoftmax(torch.autograd.Function):
    """logits_NV [N, V], ids_NK [N, K] -> logp_NK fp32, chunked in forward and backward."""

    @staticmethod
    def forward(ctx: Any, logits_NV: torch.Tensor, ids_NK: torch.Tensor, rows: int) -> torch.Tensor:
        lse_N = _row_logsumexp(logits_NV, rows)
        logp_NK = _acc(logits_NV.gather(-1, ids_NK)) - lse_N[:, None]
        ctx.save_for_backward(logits_NV, ids_NK, lse_N)
        ctx.rows = rows
        return logp_NK

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_NK: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits_NV, ids_NK, lse_N = ctx.saved_tensors
        rows = ctx.rows
        grad_NV = torch.empty_like(logits_NV)
        grad_NK = grad_NK.to(lse_N.dtype)
        for s in range(0, logits_NV.shape[0], rows):
            e = s + rows
            p = torch.exp(_acc(logits_NV[s:e]) - lse_N[s:e, None])
            g = -p * grad_NK[s:e].sum(dim=-1, keepdim=True)
            g.scatter_add_(-1, ids_NK[s:e], grad_NK[s:e])  # repeated ids accumulate
            grad_NV[s:e] = g.to(grad_NV.dtype)
        return grad_NV, None, None


def gather_log_softmax(
    logits_BTV: torch.Tensor, ids_BTK: torch.Tensor, *, chunk_rows: int | None = None
) -> torch.Tensor:
    """Log-probs of K given ids per position: logits [..., V], ids [..., K] -> logp [..., K] fp32 (fp64 for fp64 logits).

    Equals ``torch.log_softmax(logits.float(), -1).gather(-1, ids)`` without the full copy;
    differentiable w.r.t. the logits. Used e.g. for the student's log-probs at a teacher's
    top-k ids. ``chunk_rows`` bounds the rows processed at once (default: 2^26 / V).
    """
    check_tensor("logits_BTV", logits_BTV)
    check_tensor("ids_BTK", ids_BTK)
    if logits_BTV.ndim < 1 or not logits_BTV.is_floating_point():
        raise ValueError(f"logits_BTV must be a floating tensor [..., V], got {logits_BTV.dtype}")
    if ids_BTK.is_floating_point() or ids_BTK.dtype == torch.bool:
        raise ValueError(f"ids_BTK must hold integer token ids, got dtype {ids_BTK.dtype}")
    if ids_BTK.ndim != logits_BTV.ndim or ids_BTK.shape[:-1] != logits_BTV.shape[:-1]:
        raise ValueError(
            f"ids_BTK {tuple(ids_BTK.shape)} must be [..., K] with the leading dims of "
            f"logits_BTV {tuple(logits_BTV.shape)}"
        )
    V = logits_BTV.shape[-1]
    ids = ids_BTK.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(
            f"token ids span [{int(ids.min())}, {int(ids.max())}] but the vocabulary has V={V} "
            "entries; do the tokens and logits come from the same model/tokenizer?"
        )
    lead = logits_BTV.shape[:-1]
    K = ids.shape[-1]
    logits_NV = logits_BTV.reshape(-1, V)
    ids_NK = ids.reshape(-1, K)
    logp_NK = _GatherLogSoftmax.apply(logits_NV, ids_NK, _chunk_rows(V, chunk_rows))
    return logp_NK.reshape(*lead, K)


def selective_log_softmax(
    logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, *, chunk_rows: int | None = None
) -> torch.Tensor:
    """Log-prob of the given token at each position: logits [..., V], tokens [...] -> logp [...]
    in fp32 for bf16/fp16/fp32 logits (fp64 stays fp64), differentiable w.r.t. the logits.

    The logits at position t must be the ones that predict ``tokens_BT[..., t]`` (callers shift
    the model output by one position first).
    """
    check_tensor("logits_BTV", logits_BTV)
    check_tensor("tokens_BT", tokens_BT)
    if tokens_BT.shape != logits_BTV.shape[:-1]:
        raise ValueError(
            f"tokens_BT {tuple(tokens_BT.shape)} must match logits_BTV "
            f"{tuple(logits_BTV.shape)} without its last (vocabulary) dim"
        )
    return gather_log_softmax(logits_BTV, tokens_BT[..., None], chunk_rows=chunk_rows)[..., 0]


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits_NV: torch.Tensor, rows: int) -> torch.Tensor:
        N = logits_NV.shape[0]
        lse_N = torch.empty(N, dtype=_acc(logits_NV[:0]).dtype, device=logits_NV.device)
        mean_N = torch.empty_like(lse_N)  # E_p[logit]
        for s in range(0, N, rows):
            z = _acc(logits_NV[s : s + rows])
            lse = torch.logsumexp(z, dim=-1)
            p = torch.exp(z - lse[:, None])
            lse_N[s : s + rows] = lse
            # p * z with p = 0 and z = -inf (a banned token) must give 0, not NaN.
            mean_N[s : s + rows] = torch.where(p > 0, p * z, torch.zeros_like(z)).sum(dim=-1)
        ctx.save_for_backward(logits_NV, lse_N, mean_N)
        ctx.rows = rows
        return lse_N - mean_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_N: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits_NV, lse_N, mean_N = ctx.saved_tensors
        rows = ctx.rows
        grad_NV = torch.empty_like(logits_NV)
        grad_N = grad_N.to(lse_N.dtype)
        for s in range(0, logits_NV.shape[0], rows):
            e = s + rows
            z = _acc(logits_NV[s:e])
            p = torch.exp(z - lse_N[s:e, None])
            g = torch.where(p > 0, p * (mean_N[s:e, None] - z), torch.zeros_like(z))
            grad_NV[s:e] = (g * grad_N[s:e, None]).to(grad_NV.dtype)
        return grad_NV, None


def entropy_from_logits(logits_BTV: torch.Tensor, *, chunk_rows: int | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) per position: [..., V] -> [...] fp32, chunked, differentiable."""
    check_tensor("logits_BTV", logits_BTV)
    if logits_BTV.ndim < 1 or not logits_BTV.is_floating_point():
        raise ValueError(f"logits_BTV must be a floating tensor [..., V], got {logits_BTV.dtype}")
    V = logits_BTV.shape[-1]
    lead = logits_BTV.shape[:-1]
    H_N = _Entropy.apply(logits_BTV.reshape(-1, V), _chunk_rows(V, chunk_rows))
    return H_N.reshape(lead)


def topk_log_softmax(
    logits_BTV: torch.Tensor, k: int, *, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely ids per position and their log-probs (e.g. a teacher's top-k).

    logits [..., V] -> (logp [..., k] fp32, ids [..., k] int64), sorted by decreasing prob.
    Differentiable w.r.t. the logits through ``gather_log_softmax``.
    """
    check_tensor("logits_BTV", logits_BTV)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits_BTV.shape[-1]:
        raise ValueError(f"k={k!r} must be an int in [1, V={logits_BTV.shape[-1]}]")
    ids_BTK = logits_BTV.detach().topk(k, dim=-1).indices
    return gather_log_softmax(logits_BTV, ids_BTK, chunk_rows=chunk_rows), ids_BTK
