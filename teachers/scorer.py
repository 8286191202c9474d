"""``TeacherScorer``: one teacher's log-probs of the student's sampled tokens.

Each response is one prefill-only request to the teacher's servers (SGLang's ``/generate`` with
``max_new_tokens = 0``, ``return_logprob``, ``logprob_start_len = P - 1``; see
``mopd.inference.protocol``), so the teacher runs one forward pass over prompt + response and
returns the log-prob of exactly the tokens the student sampled. The pairs asked for in one
event-loop iteration (every group of a synchronous step) are coalesced (``mopd.batching``) into
one batched ``/generate`` per server, at most ``max_concurrency`` pairs per batch and in flight,
spread over the teacher's servers by least outstanding tokens with a group's responses on one
server, whose radix cache then shares their prompt: G responses cost one prompt prefill.

Failures: scoring is idempotent, so each request is retried with exponential back-off
(``max_retries``, each attempt bounded by ``timeout_s``), then moved to another server of the
teacher. A teacher none of whose servers answers raises ``TeacherUnavailableError`` naming it:
the run stops rather than train on made-up teacher rewards. A batched call that fails for good
fails every caller in it, and its requests are aborted on the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from mopd.batching import Coalescer, ItemBudget, assign_shares
from mopd.config.schema import TeacherConfig
from mopd.inference.client import ClientConfig, EngineUnavailable
from mopd.inference.pool import EnginePool, ServerLoad
from mopd.inference.protocol import ScoreOutput
from mopd.types import RolloutSample
from teachers.base import TeacherScores, TeacherUnavailableError

__all__ = ["TeacherScorer"]


class TeacherScorer:
    """Scores student responses with one teacher served at ``urls``.

    Args:
        name: the teacher's name (errors and metrics name it).
        urls: the teacher's servers (SGLang or embedded engine).
        top_logprobs: K > 0 also returns the teacher's top-K log-probs and ids per position.
        timeout_s: limit for one scoring request.
        max_retries: retries per request (exponential back-off) before moving to another
            server; when no server is left the teacher is declared down.
        max_concurrency: scoring requests in flight at once, over all servers.
        backoff_initial_s / backoff_max_s: first and largest back-off delay.
    """

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        *,
        top_logprobs: int = 0,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        max_concurrency: int = 64,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
    ):
        if top_logprobs < 0 or max_retries < 0 or max_concurrency < 1:
            raise ValueError(
                f"teacher {name!r}: need top_logprobs >= 0, max_retries >= 0, "
                f"max_concurrency >= 1; got {top_logprobs}, {max_retries}, {max_concurrency}"
            )
        self.name = name
        self.top_logprobs = top_logprobs
        config = ClientConfig(
            request_timeout_s=timeout_s,
            max_attempts=max_retries + 1,
            retry_deadline_s=(max_retries + 1) * (timeout_s + backoff_max_s),
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            max_connections=max_concurrency,
        )
        self._pool = EnginePool(urls, config, name=f"teacher {name!r}")
        self._wave = Coalescer(self._score_wave, max_items=max_concurrency)
        self._budget = ItemBudget(max_concurrency)

    @classmethod
    def from_config(
        cls, cfg: TeacherConfig, urls: Sequence[str], **kwargs: object
    ) -> TeacherScorer:
        """A scorer for the run config's teacher entry (its servers already started)."""
        return cls(
            cfg.name,
            urls,
            top_logprobs=cfg.top_logprobs,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            **kwargs,  # type: ignore[arg-type]
        )

    def loads(self) -> list[ServerLoad]:
        return self._pool.loads()

    async def score(
        self, prompt_ids_P: Sequence[int] | np.ndarray, response_ids_T: Sequence[int] | np.ndarray
    ) -> TeacherScores:
        """The teacher's log-probs of ``response_ids_T`` after ``prompt_ids_P``.

        Returns:
            TeacherScores with float32 ``logp_T`` [T] and, when top_logprobs = K > 0,
            ``topk_logp_TK`` float32 [T, K] and ``topk_ids_TK`` int32 [T, K].

        Raises:
            TeacherUnavailableError: no server of this teacher answered within its retries.
        """
        [scores] = await self.score_batch([(prompt_ids_P, response_ids_T)])
        return scores

    async def score_batch(
        self,
        items: Sequence[tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]],
    ) -> list[TeacherScores]:
        """Score (prompt ids, response ids) pairs; results in input order. The pairs of every
        caller of this event-loop iteration go to the servers together (see the module doc).

        Raises:
            TeacherUnavailableError: no server of this teacher answered within its retries.
        """
        pairs = [(np.asarray(p), np.asarray(r)) for p, r in items]
        out: list[TeacherScores | None] = [None] * len(pairs)
        todo = [i for i, (_, r) in enumerate(pairs) if r.shape[0] > 0]
        for i in set(range(len(pairs))) - set(todo):  # nothing to score: no server call
            out[i] = self._empty()
        for i, score in zip(todo, await self._wave([pairs[i] for i in todo]), strict=True):
            num_tokens = pairs[i][1].shape[0]
            if score.logprobs.shape != (num_tokens,):
                raise TeacherUnavailableError(
                    f"teacher {self.name!r} scored {score.logprobs.shape[0]} tokens of {num_tokens}"
                )
            out[i] = TeacherScores(
                teacher=self.name,
                logp_T=score.logprobs,
                topk_logp_TK=score.top_logprobs,
                topk_ids_TK=None if score.top_ids is None else score.top_ids.astype(np.int32),
                weight_version=score.weight_version,
            )
        return out  # type: ignore[return-value]

    def _empty(self) -> TeacherScores:
        k = self.top_logprobs
        return TeacherScores(
            teacher=self.name,
            logp_T=np.zeros(0, np.float32),
            topk_logp_TK=np.zeros((0, k), np.float32) if k else None,
            topk_ids_TK=np.zeros((0, k), np.int32) if k else None,
        )

    async def _score_wave(
        self, pairs: list[tuple[np.ndarray, np.ndarray]], callers: list[int]
    ) -> list[ScoreOutput]:
        """One batched scoring call per server, spread by least outstanding tokens."""
        sizes = [p.shape[0] + r.shape[0] for p, r in pairs]
        # One caller's pairs (a prompt group's responses) stay together: one prompt prefill.
        shares = assign_shares(sizes, self._pool.outstanding(), callers)
        calls = [
            self._pool.run(
                sum(sizes[i] for i in share),
                lambda client, s=[pairs[i] for i in share]: client.score_batch(
                    s, self.top_logprobs
                ),
                prefer=server,
            )
            for server, share in enumerate(shares)
            if share
        ]
        try:
            async with self._budget(len(pairs)):
                got = await asyncio.gather(*calls)
        except EngineUnavailable as exc:
            raise TeacherUnavailableError(
                f"teacher {self.name!r} is down: {exc}. Check its servers "
                f"({[load.url for load in self.loads()]}); the run stops rather than "
                "train without teacher scores."
            ) from exc
        out: list[ScoreOutput | None] = [None] * len(pairs)
        for share, scores in zip([s for s in shares if s], got, strict=True):
            for i, score in zip(share, scores, strict=True):
                out[i] = score
        return out  # type: ignore[return-value]

    async def score_samples(self, samples: Sequence[RolloutSample]) -> list[TeacherScores]:
        """Score rollout samples (their prompt and sampled response); results in input order."""
        return await self.score_batch([(s.prompt.input_ids_P, s.response_ids_T) for s in samples])

    async def health(self) -> bool:
        """True when every server of this teacher answers ``/health``."""
        return all(await asyncio.gather(*(c.health() for c in self._pool.clients)))

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def __aenter__(self) -> TeacherScorer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
