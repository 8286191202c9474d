"""Several servers of one model, used as one: least-loaded choice and failover.

Rollout routing and teacher scoring both spread requests over a model's servers. Each call goes
to the reachable server with the least outstanding work, counted in tokens (prompt plus
generation budget: an upper bound on the KV and decode work still ahead) or in requests. A
server that cannot be reached (``EngineUnavailable``) is set aside for a cool-down and the call
moves to the next one; when none is left the last errors are raised together.

Sessions are sticky: ``open_session`` opens one on the least-loaded server and every request
naming it (``GenerateRequest.session_params.id``) goes to that server, which alone holds its
earlier turns; if that server fails, the session's requests fail (no failover: another server
has no history to continue).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from mopd.inference.client import ClientConfig, EngineClient, EngineUnavailable
from mopd.inference.protocol import GenerateOutput, GenerateRequest

__all__ = ["EnginePool", "ServerLoad"]

T = TypeVar("T")


@dataclass
class ServerLoad:
    """Live load of one server, as the pool accounts it."""

    url: str
    requests: int = 0
    tokens: int = 0
    served: int = 0
    failures: int = 0
    down_until: float = 0.0


class EnginePool:
    """Clients of one model's servers with least-outstanding-load choice.

    Args:
        urls: the servers.
        client_config: transport settings of every client.
        routed_experts_shape: (num_hidden_layers, num_experts_per_tok) of the model.
        balance: count outstanding work in "tokens" or "requests".
        unhealthy_cooldown_s: how long an unreachable server is skipped.
        name: how errors name the pool (e.g. "teacher 'math'").
    """

    def __init__(
        self,
        urls: Sequence[str],
        client_config: ClientConfig | None = None,
        routed_experts_shape: tuple[int, int] | None = None,
        balance: Literal["tokens", "requests"] = "tokens",
        unhealthy_cooldown_s: float = 5.0,
        name: str = "engine pool",
    ):
        if not urls:
            raise ValueError(f"{name} needs at least one server URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"{name}: duplicate server URLs {list(urls)}")
        if balance not in ("tokens", "requests"):
            raise ValueError(f"balance must be 'tokens' or 'requests', got {balance!r}")
        self.name = name
        self.balance = balance
        self.unhealthy_cooldown_s = unhealthy_cooldown_s
        self.clients = [
            EngineClient(u, client_config, routed_experts_shape, name=f"{name} @ {u}") for u in urls
        ]
        self._loads = [ServerLoad(c.base_url) for c in self.clients]
        self._sessions: dict[str, int] = {}  # open session id -> the server holding it

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
        # Ties go to the server holding fewer open sessions (their later turns will land there).
        held = [0] * len(self._loads)
        for index in self._sessions.values():
            held[index] += 1
        if self.balance == "tokens":
            return min(
                candidates, key=lambda i: (self._loads[i].tokens, self._loads[i].requests, held[i])
            )
        return min(
            candidates, key=lambda i: (self._loads[i].requests, self._loads[i].tokens, held[i])
        )

    def outstanding(self) -> list[int]:
        """Each server's outstanding work in the pool's balance unit (tokens or requests)."""
        return [load.tokens if self.balance == "tokens" else load.requests for load in self._loads]

    async def run(
        self, cost: int, call: Callable[[EngineClient], Awaitable[T]], prefer: int | None = None
    ) -> T:
        """Run ``call`` on the least-loaded reachable server (server ``prefer`` first, when it
        is reachable), failing over to the others.

        Raises:
            EngineUnavailable: no server could take the call (names the pool and the errors).
        """
        tried: set[int] = set()
        errors: list[str] = []
        now = time.monotonic()
        first = prefer if prefer is not None and self._loads[prefer].down_until <= now else None
        while (i := first if first is not None else self._pick(tried)) is not None:
            first = None
            tried.add(i)
            load = self._loads[i]
            load.requests += 1
            load.tokens += cost
            try:
                result = await call(self.clients[i])
            except EngineUnavailable as exc:
                load.failures += 1
                load.down_until = time.monotonic() + self.unhealthy_cooldown_s
                errors.append(str(exc))
                continue
            finally:
                load.requests -= 1
                load.tokens -= cost
            load.served += 1
            return result
        down = "every server is cooling down after failures" if not errors else "; ".join(errors)
        raise EngineUnavailable(self.name, "", f"no server could take the call: {down}")

    async def generate(self, request: GenerateRequest, cost: int | None = None) -> GenerateOutput:
        """Generate on the least-loaded server, or on its session's server (sticky).

        ``cost``: outstanding work to account (default: prompt tokens + ``max_new_tokens``).
        """
        if cost is None:
            prompt = request.input_ids if request.input_ids is not None else request.text or ""
            cost = len(prompt) + request.sampling_params.max_new_tokens
        if request.session_params is None:
            return await self.run(cost, lambda c: c.generate(request))
        sid = request.session_params.id
        if sid not in self._sessions:
            raise ValueError(
                f"{self.name}: session {sid!r} was not opened through this pool; open it with "
                "EnginePool.open_session so its turns go to one server"
            )
        return await self._on(self._sessions[sid], cost, lambda c: c.generate(request))

    async def open_session(
        self, session_id: str | None = None, timeout_s: float | None = None
    ) -> str:
        """Open a session on the least-loaded reachable server; its turns will go there."""
        holder: list[int] = []

        async def call(client: EngineClient) -> str:
            sid = await client.open_session(session_id, timeout_s=timeout_s)
            holder.append(self.clients.index(client))
            return sid

        sid = await self.run(0, call)
        self._sessions[sid] = holder[-1]
        return sid

    async def close_session(self, session_id: str) -> None:
        """Close a session on its server (a no-op for an unknown id)."""
        index = self._sessions.pop(session_id, None)
        if index is not None:
            await self.clients[index].close_session(session_id)

    def session_server(self, session_id: str) -> str | None:
        """The URL of the server holding an open session (None if unknown)."""
        index = self._sessions.get(session_id)
        return None if index is None else self.clients[index].base_url

    async def _on(self, i: int, cost: int, call: Callable[[EngineClient], Awaitable[T]]) -> T:
        load = self._loads[i]
        load.requests += 1
        load.tokens += cost
        try:
            result = await call(self.clients[i])
        except EngineUnavailable:
            load.failures += 1
            load.down_until = time.monotonic() + self.unhealthy_cooldown_s
            raise
        finally:
            load.requests -= 1
            load.tokens -= cost
        load.served += 1
        return result

    async def broadcast(
        self, call: Callable[[EngineClient], Awaitable[T]]
    ) -> list[T | BaseException]:
        """Run ``call`` on every server at once; results (or exceptions) in server order."""
        return list(await asyncio.gather(*(call(c) for c in self.clients), return_exceptions=True))

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))
