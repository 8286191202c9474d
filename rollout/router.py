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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mopd.inference.client import ClientConfig, EngineClient, EngineUnavailable, WeightUpdateError
from mopd.inference.protocol import (
    GenerateOutput,
    GenerateRequest,
    WeightUpdateRequest,
    WeightUpdateResult,
)

__all__ = ["EngineRouter", "RouterConfig", "ServerLoad"]


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


@dataclass
class ServerLoad:
    """Live load of one server, as the router accounts it."""

    url: str
    requests: int = 0
    tokens: int = 0
    served: int = 0
    down_until: float = 0.0


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
        if not urls:
            raise ValueError("EngineRouter needs at least one server URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"duplicate server URLs: {list(urls)}")
        self.config = config or RouterConfig()
        self._clients = [EngineClient(u, client_config, routed_experts_shape) for u in urls]
        self._loads = [ServerLoad(c.base_url) for c in self._clients]
        self._front = (
            EngineClient(self.config.front_url, client_config, routed_experts_shape)
            if self.config.front_url
            else None
        )

    @property
    def urls(self) -> list[str]:
        return [c.base_url for c in self._clients]

    def loads(self) -> list[ServerLoad]:
        """A snapshot of every server's outstanding requests and tokens (for metrics)."""
        return [ServerLoad(**vars(load)) for load in self._loads]

    def _pick(self, exclude: set[int]) -> int | None:
        now = time.monotonic()
        candidates = [
            i for i, load in enumerate(self._loads) if i not in exclude and load.down_until <= now
        ]
        if not candidates:
            return None
        if self.config.balance == "tokens":
            return min(candidates, key=lambda i: (self._loads[i].tokens, self._loads[i].requests))
        return min(candidates, key=lambda i: (self._loads[i].requests, self._loads[i].tokens))

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        """Generate on the least-loaded reachable server."""
        request = request if request.rid else request.with_rid()
        if self._front is not None:
            return await self._front.generate(request)
        cost = request_cost(request)
        tried: set[int] = set()
        errors: list[str] = []
        while (i := self._pick(tried)) is not None:
            tried.add(i)
            load = self._loads[i]
            load.requests += 1
            load.tokens += cost
            try:
                output = await self._clients[i].generate(request)
            except EngineUnavailable as exc:
                load.down_until = time.monotonic() + self.config.unhealthy_cooldown_s
                errors.append(str(exc))
                continue
            finally:
                load.requests -= 1
                load.tokens -= cost
            load.served += 1
            return output
        raise EngineUnavailable(
            "rollout",
            "/generate",
            f"no server could take rid={request.rid}: {errors or 'all down'}",
        )

    async def generate_many(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        """Generate for several requests concurrently; outputs in request order."""
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def update_weights(self, request: WeightUpdateRequest) -> WeightUpdateResult:
        """Apply one weight sync on every server at once; raises naming those that failed."""
        results = await asyncio.gather(
            *(c.update_weights(request) for c in self._clients), return_exceptions=True
        )
        failed = [
            f"{c.base_url}: {r}"
            for c, r in zip(self._clients, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failed:
            raise WeightUpdateError("rollout", request.route, "; ".join(failed))
        return WeightUpdateResult(
            success=True,
            message="; ".join(r.message for r in results if r.message),
            num_paused_requests=sum(r.num_paused_requests for r in results),
        )

    async def weight_versions(self) -> list[str | None]:
        return list(await asyncio.gather(*(c.weight_version() for c in self._clients)))

    async def health(self) -> bool:
        return all(await asyncio.gather(*(c.health() for c in self._clients)))

    async def flush_cache(self) -> list[bool]:
        return list(await asyncio.gather(*(c.flush_cache() for c in self._clients)))

    async def abort_all(self) -> None:
        await asyncio.gather(*(c.abort(abort_all=True) for c in self._clients))

    async def aclose(self) -> None:
        clients = [*self._clients, *([self._front] if self._front else [])]
        await asyncio.gather(*(c.aclose() for c in clients))

    async def __aenter__(self) -> EngineRouter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
