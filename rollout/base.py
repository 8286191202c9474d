"""What the rest of the platform needs from a rollout backend.

A rollout backend samples the student on-policy and takes new weights; it is reached over
SGLang's HTTP protocol whatever serves it (SGLang servers, or the embedded engine server).
``rollout.router.EngineRouter`` implements it over one or many servers, and
``rollout.build.build_rollout_backend`` hands it out as ``RolloutService.router``: the run
(producer, evaluation, weight sync, the agentic ToolManager) calls these methods only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from mopd.inference.protocol import (
    GenerateOutput,
    GenerateRequest,
    WeightUpdateRequest,
    WeightUpdateResult,
)

__all__ = ["RolloutBackend"]


@runtime_checkable
class RolloutBackend(Protocol):
    @property
    def urls(self) -> list[str]:
        """One base URL per server (the run sizes its in-flight requests by their count)."""
        ...

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        """Sample one response (cancelling the call aborts it on the server)."""
        ...

    async def generate_batch(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        """Several requests (a prompt group) in one call to one server; outputs in order."""
        ...

    async def open_session(
        self, session_id: str | None = None, timeout_s: float | None = None
    ) -> str:
        """Open a multi-turn session on one server; every turn of it goes there."""
        ...

    async def close_session(self, session_id: str) -> None:
        """Close a session and free what its server holds for it."""
        ...

    async def abort_all(self) -> None:
        """Abort every request running on every server."""
        ...

    async def update_weights(self, request: WeightUpdateRequest) -> WeightUpdateResult:
        """Apply a weight sync on every server; raises unless all succeeded."""
        ...

    async def weight_versions(self) -> list[str | None]:
        """The weight version each server serves now (one entry per server)."""
        ...

    async def health(self) -> bool:
        """True when every server answers ``/health``."""
        ...

    async def aclose(self) -> None:
        """Release connections (servers are owned and stopped by whoever started them)."""
        ...
