"""What the rest of the platform needs from a rollout backend.

A rollout backend samples the student on-policy and takes new weights; it is reached over
SGLang's HTTP protocol whatever serves it (SGLang servers, or the embedded engine server).
``rollout.router.EngineRouter`` implements it over one or many servers; the driver and the
data scheduler depend on this protocol only.
"""

from __future__ import annotations

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
    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        """Sample one response (cancelling the call aborts it on the server)."""
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
