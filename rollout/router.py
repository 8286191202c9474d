"""Spread generation over several engine servers by their outstanding load.

Each request goes to the server with the least outstanding work: tokens in flight
(``prompt + max_new_tokens`` of the requests it is running, an upper bound on the KV and
decode work they still need) or, with ``balance="requests"``, the number of requests. Long
responses therefore do not pile up behind each other on one server while another idles.

A server that cannot be reached is set aside for ``unhealthy_cooldown_s`` and the request goes
to the next one (a generation the server never answered is safe to run elsewhere; the client
aborts what it gave up on). Weight syncs, version reads and health checks go to every server.

With ``front_url`` set, generation goes through an external load balancer instead (e.g.
``sglang-router``: ``python -m sglang_router.launch_router --worker-urls URL...``) and only the
admin calls go to the servers themselves, as they must reach each one.

Generation requests made in the same event-loop iteration (``generate`` without a session and
``generate_batch``: e.g. every prompt group of a synchronous step, or every eval prompt) are
coalesced (``mopd.batching.Coalescer``) into one batched ``/generate`` call per server, split
over the servers by cost: a server receives its share of the wave at once and prefills it
together, and the driver pays one round trip per server instead of one per group. The
outputs of a batched call come back together, when its longest request is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from mopd.batching import Coalescer, assign_shares
from mopd.inference.client import ClientConfig, EngineClient, WeightUpdateError
from mopd.inference.pool import EnginePool, ServerLoad
from mopd.inference.protocol import (
    GenerateOutput,
    GenerateRequest,
    WeightUpdateRequest,
    WeightUpdateResult,
    batch_key,
)

__all__ = ["EngineRouter", "RouterConfig", "ServerLoad", "request_cost"]

T = TypeVar("T")


@dataclass(frozen=True)
class RouterConfig:
    """How the router picks servers."""

    balance: Literal["tokens", "requests"] = "tokens"
    """Least outstanding tokens (prompt + max_new_tokens) or least outstanding requests."""
    front_url: str | None = None
    """An external load balancer (sglang-router) to send generation through, if any."""
    unhealthy_cooldown_s: float = 5.0
    """How long an unreachable server is skipped before it is tried again."""

    def __post_init__(self) -> None:
        if self.balance not in ("tokens", "requests"):
            raise ValueError(f"balance must be 'tokens' or 'requests', got {self.balance!r}")


def request_cost(request: GenerateRequest) -> int:
    """Tokens a request may occupy: its prompt plus its generation budget."""
    prompt = len(request.input_ids) if request.input_ids is not None else len(request.text or "")
    return prompt + request.sampling_params.max_new_tokens


class EngineRouter:
    """A ``RolloutBackend`` over one or more engine servers.

    Args:
        urls: the servers (``http://host:port``), e.g. the URLs of the RolloutWorker actors.
        config: balancing policy, optional front load balancer.
        client_config: transport settings for every server.
        routed_experts_shape: (num_hidden_layers, num_experts_per_tok) of the served model.
    """

    def __init__(
        self,
        urls: Sequence[str],
        config: RouterConfig | None = None,
        client_config: ClientConfig | None = None,
        routed_experts_shape: tuple[int, int] | None = None,
    ):
        self.config = config or RouterConfig()
        self._pool = EnginePool(
            urls,
            client_config,
            routed_experts_shape,
            balance=self.config.balance,
            unhealthy_cooldown_s=self.config.unhealthy_cooldown_s,
            name="rollout",
        )
        self._front = (
            EngineClient(self.config.front_url, client_config, routed_experts_shape)
            if self.config.front_url
            else None
        )
        self._wave: Coalescer[GenerateRequest, GenerateOutput] = Coalescer(
            self._generate_wave, on_cancel=self._abort_requests
        )

    @property
    def urls(self) -> list[str]:
        return [c.base_url for c in self._pool.clients]

    def loads(self) -> list[ServerLoad]:
        """A snapshot of every server's outstanding requests and tokens (for metrics)."""
        return self._pool.loads()

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        """Generate on the least-loaded reachable server (or through the front balancer)."""
        request = request if request.rid else request.with_rid()
        if request.session_params is not None:  # sticky: the session's server holds its turns
            return await self._pool.generate(request, request_cost(request))
        [out] = await self._wave([request])
        return out

    async def generate_batch(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        """Several requests (e.g. a prompt group) in one batched call, coalesced with the other
        requests of this event-loop iteration; outputs in request order."""
        return await self._wave([r if r.rid else r.with_rid() for r in requests])

    async def _generate_wave(
        self, requests: list[GenerateRequest], callers: list[int]
    ) -> list[GenerateOutput]:
        """The requests that can share a batched call (same ``batch_key``), in one call per
        server (or one through the front balancer) each, spread as least-outstanding-work
        routing would spread them one by one; one caller's requests (a prompt group) stay
        together. Outputs in request order."""
        kinds: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kinds.setdefault(batch_key(r), []).append(i)
        calls, where = [], []
        tokens = self._pool.balance == "tokens"
        for indices in kinds.values():
            same = [requests[i] for i in indices]
            if self._front is not None:
                calls.append(self._front.generate_batch(same))
                where.append(indices)
                continue
            costs = [request_cost(r) if tokens else 1 for r in same]
            units = [callers[i] for i in indices]  # a caller's requests (a group) stay together
            for server, share in enumerate(assign_shares(costs, self._pool.outstanding(), units)):
                if not share:
                    continue
                batch = [same[i] for i in share]
                cost = sum(request_cost(r) for r in batch)
                calls.append(
                    self._pool.run(cost, lambda c, b=batch: c.generate_batch(b), prefer=server)
                )
                where.append([indices[i] for i in share])
        outs: list[GenerateOutput | None] = [None] * len(requests)
        for indices, got in zip(where, await asyncio.gather(*calls), strict=True):
            for i, o in zip(indices, got, strict=True):
                outs[i] = o
        return outs  # type: ignore[return-value]

    def _abort_requests(self, requests: list[GenerateRequest]) -> None:
        """A caller of a coalesced call was cancelled: abort its requests wherever they run
        (an unknown rid is a no-op on the server)."""
        clients = [self._front] if self._front is not None else self._pool.clients
        for client in clients:
            for r in requests:
                client.abort_in_background(r.rid)

    async def open_session(
        self, session_id: str | None = None, timeout_s: float | None = None
    ) -> str:
        """Open a multi-turn session on the least-loaded server; all its turns go there."""
        return await self._pool.open_session(session_id, timeout_s)

    async def close_session(self, session_id: str) -> None:
        await self._pool.close_session(session_id)

    async def generate_many(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        """Generate for several requests concurrently; outputs in request order."""
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def update_weights(
        self, request: WeightUpdateRequest | Sequence[WeightUpdateRequest]
    ) -> WeightUpdateResult:
        """Apply one weight sync on every server at once (one request for all, or one per
        server in server order); raises naming those that failed."""
        per_server = [request] * len(self.urls) if not isinstance(request, Sequence) else request
        if len(per_server) != len(self.urls):
            raise ValueError(f"{len(per_server)} weight requests for {len(self.urls)} servers")
        routes = {r.route for r in per_server}
        order = {c.base_url: r for c, r in zip(self._pool.clients, per_server, strict=True)}
        results = await self._pool.broadcast(lambda c: c.update_weights(order[c.base_url]))
        failed = [
            f"{url}: {r}" for url, r in zip(self.urls, results, strict=True)
            if isinstance(r, BaseException)
        ]  # fmt: skip
        if failed:
            raise WeightUpdateError("rollout", "/".join(sorted(routes)), "; ".join(failed))
        return WeightUpdateResult(
            success=True,
            message="; ".join(r.message for r in results if r.message),
            num_paused_requests=sum(r.num_paused_requests for r in results),
        )

    async def weight_versions(self) -> list[str | None]:
        return await self._all(lambda c: c.weight_version())

    async def health(self) -> bool:
        return all(await asyncio.gather(*(c.health() for c in self._pool.clients)))

    async def flush_cache(self) -> list[bool]:
        return await self._all(lambda c: c.flush_cache())

    async def abort_all(self) -> None:
        await self._all(lambda c: c.abort(abort_all=True))

    async def _all(self, call: Callable[[EngineClient], Awaitable[T]]) -> list[T]:
        """``call`` on every server; the first failure is raised (it names its server)."""
        results = await self._pool.broadcast(call)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def aclose(self) -> None:
        await self._pool.aclose()
        if self._front is not None:
            await self._front.aclose()

    async def __aenter__(self) -> EngineRouter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
