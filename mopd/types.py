"""The records that travel between roles: one frozen dataclass per hop.

    DataScheduler --Prompt--> rollout worker --RolloutSample--> reward worker / teacher scorer
        --ScoredSample--> Redis training stream --(packing)--> MicroBatch --> trainer

Arrays are numpy (cheap to move through Ray and to encode as raw little-endian
buffers for Redis), never lists of numbers. Shape suffixes: P prompt tokens, T response
tokens, S = P + T tokens of a whole sequence, N tokens of a packed micro-batch, B sequences
in a micro-batch, L MoE layers, k experts per token, K teacher top-k.

Nothing here is mutated as it travels: a hop builds the next record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

INT_TOKENS = np.int32
FLOAT = np.float32


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _as(arr: Any, dtype: Any, name: str, ndim: int) -> np.ndarray:
    out = np.ascontiguousarray(arr, dtype=dtype)
    _check(out.ndim == ndim, f"{name} must have {ndim} dimension(s), got shape {out.shape}")
    return out


def _set_topk_pair(obj: Any, logp: str, ids: str, rows: str, n: int, ids_dtype: Any) -> None:
    """Check and normalise a frozen dataclass's teacher top-k pair: both fields or neither,
    float32 log-probs and integer ids of one shape [n, K]."""
    lp_arr, ids_arr = getattr(obj, logp), getattr(obj, ids)
    _check((lp_arr is None) == (ids_arr is None), f"{logp} and {ids} go together")
    if lp_arr is None:
        return
    lp_arr = _as(lp_arr, FLOAT, logp, 2)
    ids_arr = _as(ids_arr, ids_dtype, ids, 2)
    _check(lp_arr.shape[0] == n, f"{logp} must be [{rows}={n}, K], got shape {lp_arr.shape}")
    _check(ids_arr.shape == lp_arr.shape, f"{ids} must have the shape of {logp}")
    object.__setattr__(obj, logp, lp_arr)
    object.__setattr__(obj, ids, ids_arr)


@dataclass(frozen=True)
class Prompt:
    """One prompt handed out by the data scheduler.

    Produced by: the DataScheduler (one per sample of a group, sharing ``prompt_id``).
    Consumed by: a rollout worker (generation) and, through RolloutSample, by the
    reward worker (``answer`` and ``metadata`` feed the verifier).
    """

    prompt_id: str
    """Stable id of the prompt (shared by the G samples of its group)."""
    source: str
    """Name of the data source it came from."""
    domain: str
    """Domain of the prompt; selects the MOPD teacher."""
    input_ids_P: np.ndarray
    """int32 [P] prompt token ids."""
    text: str = ""
    """Prompt text (for logs and verifiers that need it)."""
    answer: str | None = None
    """Reference answer for outcome verifiers, if the source has one."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Source-specific fields a verifier needs (JSON-serialisable)."""
    max_new_tokens: int | None = None
    """Response limit from the source; None: the rollout default."""
    temperature: float | None = None
    """Sampling temperature from the source; None: the rollout default."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_ids_P", _as(self.input_ids_P, INT_TOKENS, "input_ids_P", 1))
        _check(self.input_ids_P.size > 0, f"prompt {self.prompt_id!r} has no tokens")


@dataclass(frozen=True)
class RolloutSample:
    """One sampled response of the student.

    Produced by: a rollout worker from the server's /generate response.
    Consumed by: the reward worker and the teacher scorer.

    ``routes_SLk`` covers every token the engine ran forward on (prompt and response
    except the last sampled token, which was never fed back: S - 1 rows), MoE layers only,
    uint8 when the model has <= 256 experts per layer else uint16.

    Multi-turn (agentic) samples. ``response_ids_T`` is everything after the prompt, in the
    order the server saw it, token ids exactly as generated and as sent (never re-tokenised):
    turn 1's output, observation 1's tokens, turn 2's output, ... . ``loss_mask_T`` is 1 on
    generated tokens and 0 on observation (tool output) tokens, which are then never trained
    on; ``logp_rollout_T`` holds the engine's log-probs of generated tokens and 0 on
    observation tokens; ``versions_T`` gives observation tokens the version of the token
    before them. ``routes_SLk`` still has S - 1 rows: the routes of every position the
    server ran (observation tokens included), as the last turn's ``routed_experts`` of a
    session returns them (rows of earlier turns as recorded when they ran).
    """

    sample_id: str
    """Unique id (prompt_id + sample index); makes re-delivery idempotent."""
    prompt: Prompt
    """The prompt it answers."""
    response_ids_T: np.ndarray
    """int32 [T] sampled token ids."""
    logp_rollout_T: np.ndarray
    """float32 [T] log-probs of the sampled tokens under the rollout engine (mu_theta)."""
    versions_T: np.ndarray
    """int32 [T] policy version that produced each token (partial rollouts span versions)."""
    finish_reason: str
    """'stop', 'length' or 'abort' (SGLang's finish_reason type)."""
    routes_SLk: np.ndarray | None = None
    """uint8/uint16 [P + T - 1, L, k] experts chosen per MoE layer, or None for dense models."""
    text: str = ""
    """Detokenised response."""
    loss_mask_T: np.ndarray | None = None
    """uint8 [T]: 1 on tokens the policy generated (trained on), 0 on tool-observation tokens;
    None means every response token is generated (single-turn)."""
    reward: float | None = None
    """Outcome reward already computed by an agentic environment when the trajectory ended;
    None: the reward worker scores the sample."""

    def __post_init__(self) -> None:
        ids = _as(self.response_ids_T, INT_TOKENS, "response_ids_T", 1)
        logp = _as(self.logp_rollout_T, FLOAT, "logp_rollout_T", 1)
        ver = _as(self.versions_T, np.int32, "versions_T", 1)
        t = ids.shape[0]
        _check(logp.shape[0] == t, f"logp_rollout_T has {logp.shape[0]} entries for {t} tokens")
        _check(ver.shape[0] == t, f"versions_T has {ver.shape[0]} entries for {t} tokens")
        object.__setattr__(self, "response_ids_T", ids)
        object.__setattr__(self, "logp_rollout_T", logp)
        object.__setattr__(self, "versions_T", ver)
        if self.loss_mask_T is not None:
            raw = np.asarray(self.loss_mask_T)
            _check(
                raw.dtype == bool or raw.dtype.kind in "iu",
                f"loss_mask_T must be bool or 0/1 integers, got {raw.dtype}",
            )
            _check(
                raw.ndim == 1 and raw.shape[0] == t, f"loss_mask_T must be [T={t}], got {raw.shape}"
            )
            _check(bool(np.isin(raw, (0, 1)).all()), "loss_mask_T must hold only 0 and 1")
            object.__setattr__(self, "loss_mask_T", np.ascontiguousarray(raw, dtype=np.uint8))
        if self.reward is not None:
            _check(
                isinstance(self.reward, (int, float, np.floating, np.integer))
                and not isinstance(self.reward, bool)
                and np.isfinite(self.reward),
                f"reward must be a finite number or None, got {self.reward!r}",
            )
            object.__setattr__(self, "reward", float(self.reward))
        if self.routes_SLk is not None:
            r = np.ascontiguousarray(self.routes_SLk)
            _check(r.ndim == 3, f"routes_SLk must be [S-1, L, k], got shape {r.shape}")
            _check(
                r.dtype in (np.uint8, np.uint16), f"routes_SLk must be uint8/uint16, got {r.dtype}"
            )
            s = self.prompt.input_ids_P.shape[0] + t
            _check(
                r.shape[0] == s - 1,
                f"routes_SLk has {r.shape[0]} rows; expected prompt + response - 1 = {s - 1}",
            )
            object.__setattr__(self, "routes_SLk", r)

    @property
    def num_tokens(self) -> int:
        """Prompt plus response tokens."""
        return int(self.prompt.input_ids_P.shape[0] + self.response_ids_T.shape[0])

    @property
    def generated_mask_T(self) -> np.ndarray:
        """bool [T]: True on tokens the policy generated (``loss_mask_T``, or all of them)."""
        t = self.response_ids_T.shape[0]
        return np.ones(t, dtype=bool) if self.loss_mask_T is None else self.loss_mask_T.astype(bool)


@dataclass(frozen=True)
class ScoredSample:
    """A rollout sample with its outcome reward and its teacher's log-probs.

    Produced by: the reward worker (reward) and teacher scorer (teacher log-probs).
    Consumed by: the Redis training stream, then packing into MicroBatches.
    """

    sample: RolloutSample
    """The rollout sample."""
    reward: float
    """Outcome reward of the whole response (ORM)."""
    advantage: float
    """Sequence-level ORM advantage (group-normalised over the prompt's group)."""
    logp_teacher_T: np.ndarray | None = None
    """float32 [T] teacher log-probs of the sampled tokens; None outside MOPD."""
    teacher_topk_logp_TK: np.ndarray | None = None
    """float32 [T, K] teacher top-k log-probs (teacher_kl=topk only)."""
    teacher_topk_ids_TK: np.ndarray | None = None
    """int32 [T, K] the ids of those top-k tokens."""
    teacher: str | None = None
    """Name of the teacher that scored it."""

    def __post_init__(self) -> None:
        t = self.sample.response_ids_T.shape[0]
        if self.logp_teacher_T is not None:
            lt = _as(self.logp_teacher_T, FLOAT, "logp_teacher_T", 1)
            _check(lt.shape[0] == t, f"logp_teacher_T has {lt.shape[0]} entries for {t} tokens")
            object.__setattr__(self, "logp_teacher_T", lt)
        _set_topk_pair(self, "teacher_topk_logp_TK", "teacher_topk_ids_TK", "T", t, INT_TOKENS)


@dataclass(frozen=True)
class MicroBatch:
    """Sequences packed back to back into one flat token row (no padding).

    Produced by: token-balanced packing of ScoredSamples (one per data-parallel rank and
    accumulation step). Consumed by: ``Trainer.forward_backward``.

    Position ``i`` holds token ``tokens_N[i]``; the per-token training fields are aligned to
    the token they score (the log-prob of ``tokens_N[i]`` given the tokens before it), so
    prompt positions carry ``loss_mask_N = False``.
    """

    tokens_N: np.ndarray
    """int32 [N] token ids of all sequences, concatenated."""
    cu_seqlens_B1: np.ndarray
    """int32 [B + 1] sequence boundaries: sequence b is tokens_N[cu[b]:cu[b+1]]."""
    loss_mask_N: np.ndarray
    """bool [N] True on generated response tokens (never prompt or tool-output tokens)."""
    logp_rollout_N: np.ndarray
    """float32 [N] rollout log-probs of each token (0 where masked)."""
    adv_orm_B: np.ndarray
    """float32 [B] sequence-level ORM advantages."""
    logp_teacher_N: np.ndarray | None = None
    """float32 [N] teacher log-probs (0 where masked); None outside MOPD."""
    teacher_topk_logp_NK: np.ndarray | None = None
    """float32 [N, K] the teacher's top-k log-probs per token (0 where masked); set only when
    the teachers return top-k log-probs (algorithm.teacher_kl=topk)."""
    teacher_topk_ids_NK: np.ndarray | None = None
    """int32 [N, K] the token ids of ``teacher_topk_logp_NK``."""
    versions_N: np.ndarray | None = None
    """int32 [N] policy version per token (-1 on prompt tokens)."""
    routes_NLk: np.ndarray | None = None
    """uint8/uint16 [N, L, k] replayed experts per token; the last token of each sequence,
    which the engine never ran forward, repeats the row before it."""
    sample_ids: tuple[str, ...] = ()
    """The sample ids in this micro-batch (acknowledged after the step is committed)."""
    domains: tuple[str, ...] = ()
    """Domain of each sequence (per-domain metrics)."""

    def __post_init__(self) -> None:
        n = _as(self.tokens_N, INT_TOKENS, "tokens_N", 1).shape[0]
        cu = _as(self.cu_seqlens_B1, np.int32, "cu_seqlens_B1", 1)
        _check(cu.shape[0] >= 2 and cu[0] == 0 and cu[-1] == n, "cu_seqlens must run 0..N")
        _check(bool(np.all(np.diff(cu) > 0)), "cu_seqlens must be strictly increasing")
        b = cu.shape[0] - 1
        mask = np.ascontiguousarray(self.loss_mask_N, dtype=bool)
        _check(mask.shape == (n,), f"loss_mask_N must be [N={n}]")
        adv = _as(self.adv_orm_B, FLOAT, "adv_orm_B", 1)
        _check(adv.shape[0] == b, f"adv_orm_B has {adv.shape[0]} entries for {b} sequences")
        object.__setattr__(self, "tokens_N", np.ascontiguousarray(self.tokens_N, dtype=INT_TOKENS))
        object.__setattr__(self, "cu_seqlens_B1", cu)
        object.__setattr__(self, "loss_mask_N", mask)
        object.__setattr__(self, "adv_orm_B", adv)
        for name in ("logp_rollout_N", "logp_teacher_N"):
            value = getattr(self, name)
            if value is not None:
                arr = _as(value, FLOAT, name, 1)
                _check(arr.shape[0] == n, f"{name} must be [N={n}]")
                object.__setattr__(self, name, arr)
        _set_topk_pair(self, "teacher_topk_logp_NK", "teacher_topk_ids_NK", "N", n, np.int32)
        if self.versions_N is not None:
            ver = _as(self.versions_N, np.int32, "versions_N", 1)
            _check(ver.shape[0] == n, f"versions_N must be [N={n}]")
            object.__setattr__(self, "versions_N", ver)
        if self.routes_NLk is not None:
            r = np.ascontiguousarray(self.routes_NLk)
            _check(r.ndim == 3 and r.shape[0] == n, f"routes_NLk must be [N={n}, L, k]")
            _check(
                r.dtype in (np.uint8, np.uint16), f"routes_NLk must be uint8/uint16, got {r.dtype}"
            )
            object.__setattr__(self, "routes_NLk", r)
        _check(
            not self.sample_ids or len(self.sample_ids) == b,
            f"{len(self.sample_ids)} sample ids for {b} sequences",
        )
        _check(
            not self.domains or len(self.domains) == b,
            f"{len(self.domains)} domains for {b} sequences",
        )

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens_B1.shape[0] - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens_N.shape[0])
