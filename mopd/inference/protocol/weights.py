"""Weight sync: the JSON bodies of SGLang's weight routes and their answer.

One frozen dataclass per admin route (``route`` names it); ``EngineClient.update_weights``
sends any of them (``WeightUpdateRequest``) and parses the answer into a
``WeightUpdateResult``. Field names follow SGLang 0.5.23 ``srt/managers/io_struct.py``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from mopd.inference.protocol.common import ProtocolError, json_fields


@dataclass(frozen=True)
class UpdateWeightsFromDisk:
    """Reload weights from a checkpoint directory (HF layout, safetensors)."""

    route: ClassVar[str] = "/update_weights_from_disk"
    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False

    def to_json(self) -> dict[str, Any]:
        return json_fields(self)


@dataclass(frozen=True)
class UpdateWeightsFromTensor:
    """Load tensors handed over in-process (CUDA IPC on GPU): one opaque payload per TP rank.

    The payloads are the engine's serialized named tensors (SGLang: its
    ``MultiprocessingSerializer`` bytes); JSON carries them base64-encoded.
    """

    route: ClassVar[str] = "/update_weights_from_tensor"
    serialized_named_tensors: tuple[bytes, ...]
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False

    def __post_init__(self) -> None:
        payloads = tuple(self.serialized_named_tensors)
        if not payloads or not all(isinstance(p, bytes | bytearray) for p in payloads):
            raise ProtocolError("serialized_named_tensors must be a non-empty list of bytes")
        object.__setattr__(self, "serialized_named_tensors", payloads)

    def to_json(self) -> dict[str, Any]:
        body = json_fields(self, skip=("serialized_named_tensors",))
        body["serialized_named_tensors"] = [
            base64.b64encode(p).decode("ascii") for p in self.serialized_named_tensors
        ]
        return body


_TORCH_DTYPES = frozenset(
    {
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "float8_e4m3fn",
        "float8_e5m2",
        "int8",
        "uint8",
        "int32",
        "int64",
    }
)


@dataclass(frozen=True)
class UpdateWeightsFromDistributed:
    """Receive the named tensors by NCCL broadcast in group ``group_name`` (metadata only here)."""

    route: ClassVar[str] = "/update_weights_from_distributed"
    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    group_name: str = "weight_update_group"
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False

    def __post_init__(self) -> None:
        names, dtypes = tuple(self.names), tuple(d.removeprefix("torch.") for d in self.dtypes)
        shapes = tuple(tuple(int(x) for x in s) for s in self.shapes)
        if not len(names) == len(dtypes) == len(shapes) or not names:
            raise ProtocolError(
                f"names, dtypes and shapes must be non-empty and of equal length, got "
                f"{len(names)}, {len(dtypes)}, {len(shapes)}"
            )
        bad = sorted(set(dtypes) - _TORCH_DTYPES)
        if bad:
            raise ProtocolError(f"unknown dtypes {bad}; use torch dtype names such as 'bfloat16'")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "dtypes", dtypes)
        object.__setattr__(self, "shapes", shapes)

    def to_json(self) -> dict[str, Any]:
        body = json_fields(self, skip=("shapes",))
        body["shapes"] = [list(s) for s in self.shapes]
        return body


@dataclass(frozen=True)
class InitWeightsUpdateGroup:
    """Join the trainer's process group (the trainer is rank 0; engines from rank_offset)."""

    route: ClassVar[str] = "/init_weights_update_group"
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"

    def __post_init__(self) -> None:
        if not 0 < self.rank_offset < self.world_size:
            raise ProtocolError(
                f"rank_offset must lie in [1, world_size) (rank 0 is the trainer), got "
                f"{self.rank_offset} of {self.world_size}"
            )

    def to_json(self) -> dict[str, Any]:
        return json_fields(self)


@dataclass(frozen=True)
class DestroyWeightsUpdateGroup:
    route: ClassVar[str] = "/destroy_weights_update_group"
    group_name: str = "weight_update_group"

    def to_json(self) -> dict[str, Any]:
        return json_fields(self)


@dataclass(frozen=True)
class UpdateWeightVersion:
    """Relabel the served weights (no reload): the version later responses report."""

    route: ClassVar[str] = "/update_weight_version"
    new_version: str
    abort_all_requests: bool = False

    def to_json(self) -> dict[str, Any]:
        return json_fields(self)


WeightUpdateRequest = (
    UpdateWeightsFromDisk
    | UpdateWeightsFromTensor
    | UpdateWeightsFromDistributed
    | InitWeightsUpdateGroup
    | DestroyWeightsUpdateGroup
    | UpdateWeightVersion
)


@dataclass(frozen=True)
class WeightUpdateResult:
    """``{"success", "message"[, "num_paused_requests"]}`` of the weight routes."""

    success: bool
    message: str
    num_paused_requests: int = 0


def parse_weight_update_result(payload: Any, route: str) -> WeightUpdateResult:
    if not isinstance(payload, Mapping) or "success" not in payload:
        raise ProtocolError(f"{route} answered {payload!r}, expected {{'success', 'message'}}")
    return WeightUpdateResult(
        success=bool(payload["success"]),
        message=str(payload.get("message", "")),
        num_paused_requests=int(payload.get("num_paused_requests", 0) or 0),
    )
