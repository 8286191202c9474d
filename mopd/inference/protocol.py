"""The SGLang HTTP protocol, as typed values: requests out, parsed responses in.

Both rollout backends speak this protocol: SGLang servers in production and the project's
embedded engine server everywhere else (`python -m rollout.server`). Field names, response
shapes and the routed-experts wire format follow SGLang 0.5.23 (the PyPI wheel
``sglang-0.5.23``; files ``srt/managers/io_struct.py``, ``srt/sampling/sampling_params.py``,
``srt/entrypoints/http_server.py``, ``srt/managers/tokenizer_manager.py``,
``srt/state_capturer/{base,routed_experts}.py``). ``sglang_schema.py`` holds the field and flag
names read from that version; tests hold everything this module emits to it.

Routed experts (R3, rollout routing replay). With ``--enable-return-routed-experts`` on the
server and ``return_routed_experts: true`` in the request, ``meta_info["routed_experts"]`` is
the base64 of the raw bytes of a C-contiguous int32 array of shape
``[seqlen - 1 - start_len, num_hidden_layers, num_experts_per_tok]``: one row per position the
model ran forward on from ``routed_experts_start_len`` (prompt included, default 0) up to but
not including the last sampled token (which was never fed back), for every decoder layer,
dense layers included (their rows hold whatever the capture buffer had: meaningless).
``compact_routes`` turns that into the payload the rest of the platform carries: MoE layers
only, narrowed to uint8 (uint16 past 256 experts).

Shape legend:
    T   positions with routing (seqlen - 1 - start_len)
    L   decoder layers (all of them, as SGLang sends them); L_moe: MoE layers only
    k   experts per token (num_experts_per_tok)
    P   prompt tokens; N: generated (or scored response) tokens
    S   positions with input log-probs (P - logprob_start_len)
    K   top log-probs per position

Log-probs (tokenizer_manager.py, logprob_result_processor.py). ``output_token_logprobs`` is a list
of ``[logprob, token_id, text_or_null]``, one per generated token. ``input_token_logprobs`` has
one entry per prompt position from ``logprob_start_len`` on, and its first entry always has a
null log-prob (the position that would predict it was not computed). Scoring a response of N
tokens after a prompt of P tokens is therefore a prefill-only request (``max_new_tokens = 0``)
over prompt + response with ``logprob_start_len = P - 1``: entries 1..N are the response tokens.
Parsed outputs hold numpy arrays (float32 log-probs, int64 token ids), never lists; a missing
log-prob is NaN.
"""

from __future__ import annotations

import base64
import binascii
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import numpy as np

__all__ = [
    "DestroyWeightsUpdateGroup",
    "FinishReason",
    "GenerateOutput",
    "GenerateRequest",
    "InitWeightsUpdateGroup",
    "ModelInfo",
    "ProtocolError",
    "SamplingParams",
    "ScoreOutput",
    "SessionParams",
    "UpdateWeightVersion",
    "UpdateWeightsFromDisk",
    "UpdateWeightsFromDistributed",
    "UpdateWeightsFromTensor",
    "WeightUpdateRequest",
    "WeightUpdateResult",
    "WeightVersionSpan",
    "batch_json",
    "compact_routes",
    "decode_routed_experts",
    "encode_routed_experts",
    "make_score_request",
    "parse_generate_output",
    "parse_model_info",
    "parse_score_output",
    "parse_weight_update_result",
]


class ProtocolError(ValueError):
    """A request or response does not follow the SGLang protocol (names what is wrong)."""


# ---------------------------------------------------------------------------------------------
# Routed experts wire format
# ---------------------------------------------------------------------------------------------

_WIRE_DTYPE = np.dtype("<i4")  # SGLang's capture buffers are torch.int32, sent as raw bytes


def encode_routed_experts(routes_TLk: np.ndarray) -> str:
    """Encode routed expert ids the way SGLang puts them in ``meta_info["routed_experts"]``.

    Args:
        routes_TLk: integer array [T, L, k] (all decoder layers, dense ones included).

    Returns:
        base64 (standard alphabet, padded) of the array as little-endian int32, row-major.
    """
    routes_TLk = np.asarray(routes_TLk)
    if routes_TLk.ndim != 3:
        raise ProtocolError(
            f"routed experts must be a 3-d array [T, L, k], got shape {routes_TLk.shape}"
        )
    if routes_TLk.dtype.kind not in "iu":
        raise ProtocolError(f"routed experts must be integers, got dtype {routes_TLk.dtype}")
    wire_TLk = np.ascontiguousarray(routes_TLk, dtype=_WIRE_DTYPE)
    return base64.b64encode(wire_TLk.tobytes()).decode("ascii")


def decode_routed_experts(b64: str, num_layers: int, top_k: int) -> np.ndarray:
    """Decode ``meta_info["routed_experts"]`` into an int32 array [T, L, k].

    Args:
        b64: the base64 string from the response.
        num_layers: the model's ``num_hidden_layers`` (all layers, dense ones too).
        top_k: the model's ``num_experts_per_tok``.

    Raises:
        ProtocolError: the string is not base64, or its size is not a multiple of
            ``num_layers * top_k`` int32 values.
    """
    if num_layers <= 0 or top_k <= 0:
        raise ProtocolError(f"num_layers and top_k must be positive, got {num_layers}, {top_k}")
    if not isinstance(b64, str):
        raise ProtocolError(f"routed experts must be a base64 string, got {type(b64).__name__}")
    try:
        raw = base64.b64decode(b64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ProtocolError(f"routed experts are not valid base64: {exc}") from exc
    row_bytes = num_layers * top_k * _WIRE_DTYPE.itemsize
    if len(raw) % row_bytes:
        raise ProtocolError(
            f"routed experts hold {len(raw)} bytes, not a multiple of num_layers * top_k * 4 = "
            f"{num_layers} * {top_k} * 4; check num_layers (num_hidden_layers, dense layers "
            "included) and top_k (num_experts_per_tok) against the served model"
        )
    routes_TLk = np.frombuffer(raw, dtype=_WIRE_DTYPE).reshape(-1, num_layers, top_k)
    return routes_TLk.astype(np.int32)  # native byte order, writable copy


def compact_routes(
    routes_TLk: np.ndarray, moe_layer_ids: Sequence[int], num_experts: int
) -> np.ndarray:
    """Keep the MoE layers and narrow the ids: [T, L, k] int -> [T, L_moe, k] uint8/uint16.

    Args:
        routes_TLk: expert ids for every decoder layer, as decoded from SGLang.
        moe_layer_ids: indices (into L) of the layers that have a routed MoE block, ascending.
        num_experts: routed experts per MoE layer; ids must lie in [0, num_experts).

    Returns:
        uint8 array when ``num_experts <= 256``, else uint16 (``num_experts <= 65536``).
    """
    routes_TLk = np.asarray(routes_TLk)
    if routes_TLk.ndim != 3:
        raise ProtocolError(f"routes must be [T, L, k], got shape {routes_TLk.shape}")
    if not 0 < num_experts <= 65536:
        raise ProtocolError(f"num_experts must be in [1, 65536], got {num_experts}")
    layer_ids = np.asarray(list(moe_layer_ids), dtype=np.int64)
    num_layers = routes_TLk.shape[1]
    if layer_ids.size and (layer_ids.min() < 0 or layer_ids.max() >= num_layers):
        raise ProtocolError(
            f"moe_layer_ids {layer_ids.tolist()} out of range for {num_layers} layers"
        )
    if np.any(np.diff(layer_ids) <= 0):
        raise ProtocolError(f"moe_layer_ids must be strictly ascending, got {layer_ids.tolist()}")
    moe_TLk = routes_TLk[:, layer_ids, :]
    if moe_TLk.size and (moe_TLk.min() < 0 or moe_TLk.max() >= num_experts):
        raise ProtocolError(
            f"expert ids on MoE layers must lie in [0, {num_experts}), found "
            f"[{moe_TLk.min()}, {moe_TLk.max()}]; wrong num_experts or moe_layer_ids?"
        )
    dtype = np.uint8 if num_experts <= 256 else np.uint16
    return np.ascontiguousarray(moe_TLk, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


def _json_fields(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dataclass's set fields as a JSON dict: None means "unset, use the server default"."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None or f.name in skip:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ProtocolError(
            f"{name} must be a 1-d sequence of ints, got {array.dtype} {array.shape}"
        )
    return tuple(int(v) for v in array.tolist())


@dataclass(frozen=True)
class SamplingParams:
    """SGLang ``sampling_params`` (srt/sampling/sampling_params.py). None leaves SGLang's default.

    ``n`` is not offered: a group of samples is sent as separate requests (each with its own
    ``sampling_seed`` when reproducibility matters), so each sample is scheduled, load-balanced
    and cancelled on its own; the radix cache still shares the prompt prefix.
    """

    max_new_tokens: int = 128
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 (or None) = whole vocabulary
    min_p: float | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    min_new_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ProtocolError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ProtocolError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ProtocolError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k != -1 and self.top_k < 1:
            raise ProtocolError(f"top_k must be -1 (all) or >= 1, got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ProtocolError(f"min_p must be in [0, 1], got {self.min_p}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is not None:
            ids = _int_tuple("stop_token_ids", self.stop_token_ids)
            object.__setattr__(self, "stop_token_ids", ids)

    def to_json(self) -> dict[str, Any]:
        """The ``sampling_params`` JSON object (unset fields omitted)."""
        return _json_fields(self)


@dataclass(frozen=True)
class SessionParams:
    """``GenerateReqInput.session_params`` (io_struct.py ``SessionParams``): continue a turn.

    A session is opened with ``EngineClient.open_session`` and holds its requests on the
    server. With ``rid`` = an earlier (finished) request of session ``id``, the server runs
    that request's prompt + its output tokens + this request's ``input_ids`` (a leading BOS
    of ``input_ids`` is dropped), reusing what it cached of the earlier part. ``rid`` None
    starts a fresh branch. ``offset`` cuts the earlier context to its first ``offset`` tokens
    before appending; ``drop_previous_output`` appends to the earlier prompt only; ``replace``
    discards the requests that had continued ``rid``. The response then counts the whole
    context: ``prompt_tokens``, input log-prob positions and ``routed_experts`` rows (from
    ``routed_experts_start_len``, default 0: the whole sequence) all start at the session's
    first token, while ``output_ids`` / ``output_token_logprobs`` are this turn's tokens only.
    """

    id: str
    rid: str | None = None
    offset: int | None = None
    replace: bool | None = None
    drop_previous_output: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ProtocolError(f"SessionParams.id must be a session id string, got {self.id!r}")
        if self.offset is not None and self.offset < 0:
            raise ProtocolError(f"SessionParams.offset must be >= 0, got {self.offset}")

    def to_json(self) -> dict[str, Any]:
        """The ``session_params`` JSON object (unset fields omitted)."""
        return _json_fields(self)


@dataclass(frozen=True)
class GenerateRequest:
    """One ``POST /generate`` request (srt/managers/io_struct.py ``GenerateReqInput``).

    Exactly one of ``input_ids`` / ``text``. ``rid`` is the handle for ``/abort_request``; the
    client fills a fresh one when unset. Streaming is not used: one response per request.
    ``session_params`` continues an earlier request of a session (see ``SessionParams``);
    ``input_ids`` are then only the new tokens (may be empty when ``rid`` is set), and
    ``logprob_start_len`` / ``routed_experts_start_len`` count from the session's first token.
    """

    input_ids: tuple[int, ...] | None = None
    text: str | None = None
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    rid: str | None = None
    return_logprob: bool = False
    logprob_start_len: int | None = None  # None/-1: output log-probs only
    top_logprobs_num: int = 0
    token_ids_logprob: tuple[int, ...] | None = None
    return_text_in_logprobs: bool = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    session_params: SessionParams | None = None

    def __post_init__(self) -> None:
        if (self.input_ids is None) == (self.text is None):
            raise ProtocolError("a GenerateRequest needs exactly one of input_ids or text")
        continues = self.session_params is not None and self.session_params.rid is not None
        if self.input_ids is not None:
            ids = _int_tuple("input_ids", self.input_ids)
            if not ids and not continues:
                raise ProtocolError("input_ids is empty: SGLang needs at least one prompt token")
            object.__setattr__(self, "input_ids", ids)
        if self.token_ids_logprob is not None:
            ids = _int_tuple("token_ids_logprob", self.token_ids_logprob)
            object.__setattr__(self, "token_ids_logprob", ids)
        asks_logprob_detail = (
            self.top_logprobs_num > 0
            or self.token_ids_logprob is not None
            or self.logprob_start_len not in (None, -1)
        )
        if asks_logprob_detail and not self.return_logprob:
            raise ProtocolError(
                "top_logprobs_num, token_ids_logprob and logprob_start_len need "
                "return_logprob=True (SGLang ignores them otherwise)"
            )
        if self.top_logprobs_num < 0:
            raise ProtocolError(f"top_logprobs_num must be >= 0, got {self.top_logprobs_num}")
        # A session request's positions count from the session's first token (unknown here).
        prompt_len = None
        if self.input_ids is not None and self.session_params is None:
            prompt_len = len(self.input_ids)
        if self.logprob_start_len is not None and self.logprob_start_len < -1:
            raise ProtocolError(f"logprob_start_len must be >= -1, got {self.logprob_start_len}")
        if prompt_len is not None and (self.logprob_start_len or 0) > prompt_len:
            raise ProtocolError(
                f"logprob_start_len {self.logprob_start_len} exceeds the prompt ({prompt_len})"
            )
        if self.routed_experts_start_len < 0 or (
            prompt_len is not None and self.routed_experts_start_len > prompt_len
        ):
            raise ProtocolError(
                f"routed_experts_start_len must lie in [0, prompt tokens], got "
                f"{self.routed_experts_start_len}"
            )

    def with_rid(self, rid: str | None = None) -> GenerateRequest:
        """This request with ``rid`` set (a fresh uuid4 hex when None)."""
        return replace(self, rid=rid or uuid.uuid4().hex)

    def to_json(self) -> dict[str, Any]:
        """The JSON body, with SGLang's field names; defaults are omitted."""
        body: dict[str, Any] = {}
        if self.rid is not None:
            body["rid"] = self.rid
        if self.input_ids is not None:
            body["input_ids"] = list(self.input_ids)
        else:
            body["text"] = self.text
        body["sampling_params"] = self.sampling_params.to_json()
        if self.return_logprob:
            body["return_logprob"] = True
            if self.logprob_start_len is not None:
                body["logprob_start_len"] = self.logprob_start_len
            if self.top_logprobs_num:
                body["top_logprobs_num"] = self.top_logprobs_num
            if self.token_ids_logprob is not None:
                body["token_ids_logprob"] = list(self.token_ids_logprob)
            if self.return_text_in_logprobs:
                body["return_text_in_logprobs"] = True
        if self.return_routed_experts:
            body["return_routed_experts"] = True
            if self.routed_experts_start_len:
                body["routed_experts_start_len"] = self.routed_experts_start_len
        if self.session_params is not None:
            body["session_params"] = self.session_params.to_json()
        return body


def make_score_request(
    prompt_ids: Sequence[int] | np.ndarray,
    response_ids: Sequence[int] | np.ndarray,
    top_logprobs_num: int = 0,
    rid: str | None = None,
) -> GenerateRequest:
    """A prefill-only request scoring ``response_ids`` after ``prompt_ids`` (see module doc)."""
    prompt = _int_tuple("prompt_ids", prompt_ids)
    response = _int_tuple("response_ids", response_ids)
    if not prompt:
        raise ProtocolError("scoring needs a non-empty prompt (the first token has no log-prob)")
    return GenerateRequest(
        input_ids=prompt + response,
        sampling_params=SamplingParams(max_new_tokens=0),
        rid=rid,
        return_logprob=True,
        logprob_start_len=len(prompt) - 1,
        top_logprobs_num=top_logprobs_num,
    )


# ---------------------------------------------------------------------------------------------
# Weight sync and memory requests (JSON bodies of the admin routes)
# ---------------------------------------------------------------------------------------------


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
        return _json_fields(self)


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
        body = _json_fields(self, skip=("serialized_named_tensors",))
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
        body = _json_fields(self, skip=("shapes",))
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
        return _json_fields(self)


@dataclass(frozen=True)
class DestroyWeightsUpdateGroup:
    route: ClassVar[str] = "/destroy_weights_update_group"
    group_name: str = "weight_update_group"

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)


@dataclass(frozen=True)
class UpdateWeightVersion:
    """Relabel the served weights (no reload): the version later responses report."""

    route: ClassVar[str] = "/update_weight_version"
    new_version: str
    abort_all_requests: bool = False

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)


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


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishReason:
    """``meta_info.finish_reason``: ``{"type": "stop", "matched": id|str}``,
    ``{"type": "length", "length": n}`` or ``{"type": "abort", "message": ...}``."""

    type: Literal["stop", "length", "abort"]
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None

    @classmethod
    def from_json(cls, raw: Any) -> FinishReason | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping) or raw.get("type") not in ("stop", "length", "abort"):
            raise ProtocolError(f"finish_reason {raw!r} is not one of stop/length/abort")
        matched = raw.get("matched")
        if isinstance(matched, list):  # a matched stop sequence given as token ids
            matched = str(matched)
        return cls(
            type=raw["type"], matched=matched, length=raw.get("length"), message=raw.get("message")
        )


@dataclass(frozen=True)
class WeightVersionSpan:
    """Output tokens [start, end) were generated by weights labelled ``version``."""

    version: str
    start: int
    end: int


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class GenerateOutput:
    """One parsed ``/generate`` response. Produced by the client, consumed by rollout workers
    and teacher scorers. Arrays are read-only numpy; optional fields are None when not asked.

    Attributes:
        output_ids: int64 [N] generated token ids.
        output_logprobs: float32 [N] log-prob of each generated token (return_logprob).
        output_top_logprobs / output_top_ids: float32 / int64 [N, K] (top_logprobs_num = K).
        input_token_ids: int64 [S] prompt ids from logprob_start_len on (logprob_start_len >= 0).
        input_logprobs: float32 [S], NaN at position 0 (SGLang sends null there).
        input_top_logprobs / input_top_ids: [S, K], NaN / -1 where SGLang sends null.
        routed_experts: int32 [T, L, k] (return_routed_experts), T = P + N - 1 - start_len.
        weight_version_spans: which weights produced which output tokens (partial rollouts).
    """

    rid: str
    text: str | None
    output_ids: np.ndarray
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: FinishReason | None
    weight_version: str | None
    weight_version_spans: tuple[WeightVersionSpan, ...] = ()
    output_logprobs: np.ndarray | None = None
    output_top_logprobs: np.ndarray | None = None
    output_top_ids: np.ndarray | None = None
    input_token_ids: np.ndarray | None = None
    input_logprobs: np.ndarray | None = None
    input_top_logprobs: np.ndarray | None = None
    input_top_ids: np.ndarray | None = None
    routed_experts: np.ndarray | None = None

    @property
    def aborted(self) -> bool:
        return self.finish_reason is not None and self.finish_reason.type == "abort"


def _logprob_entries(raw: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``[[logprob|null, token_id, text|null], ...]`` -> (float32 [n] with NaN, int64 [n])."""
    if not isinstance(raw, list):
        raise ProtocolError(f"{what} must be a list of [logprob, token_id, text], got {raw!r:.80}")
    logprobs = np.empty(len(raw), dtype=np.float32)
    ids = np.empty(len(raw), dtype=np.int64)
    for i, entry in enumerate(raw):
        if not isinstance(entry, list | tuple) or len(entry) < 2:
            raise ProtocolError(f"{what}[{i}] = {entry!r} is not [logprob, token_id, text]")
        logprobs[i] = math.nan if entry[0] is None else float(entry[0])
        ids[i] = int(entry[1])
    return logprobs, ids


def _top_entries(raw: Any, k: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Per position a list of k entries (or null) -> float32 [n, k] (NaN), int64 [n, k] (-1)."""
    if not isinstance(raw, list):
        raise ProtocolError(f"{what} must be a list (one row per position), got {raw!r:.80}")
    logprobs = np.full((len(raw), k), np.nan, dtype=np.float32)
    ids = np.full((len(raw), k), -1, dtype=np.int64)
    for i, row in enumerate(raw):
        if row is None:
            continue
        row_lp, row_ids = _logprob_entries(row, f"{what}[{i}]")
        if len(row_lp) < k:
            raise ProtocolError(f"{what}[{i}] has {len(row_lp)} entries, asked for {k}")
        logprobs[i], ids[i] = row_lp[:k], row_ids[:k]
    return logprobs, ids


def _require(meta: Mapping[str, Any], key: str, why: str, rid: str) -> Any:
    if key not in meta or meta[key] is None:
        raise ProtocolError(
            f"response for rid={rid} lacks meta_info[{key!r}] although the request asked for "
            f"{why}; is the server an SGLang-compatible engine (and for routed experts, started "
            "with --enable-return-routed-experts)?"
        )
    return meta[key]


_PER_PROMPT = ("rid", "input_ids", "text", "sampling_params")


def batch_json(requests: Sequence[GenerateRequest]) -> dict[str, Any]:
    """One batched ``/generate`` body for ``requests`` (SGLang's batch form: ``input_ids`` a
    list of lists, ``sampling_params`` and ``rid`` lists). The server answers a list in request
    order. Every other field must be the same for all requests, and none may continue a
    session (SGLang takes one session request at a time)."""
    if not requests:
        raise ProtocolError("a batched /generate needs at least one request")
    bodies = [r.to_json() for r in requests]
    if any(r.session_params is not None for r in requests):
        raise ProtocolError("session requests cannot be batched: send each turn on its own")
    if any(r.rid is None for r in requests):
        raise ProtocolError("every request of a batch needs a rid (GenerateRequest.with_rid)")
    kinds = {"input_ids" in b for b in bodies}
    if len(kinds) != 1:
        raise ProtocolError("a batch mixes input_ids and text requests")
    shared = {k: v for k, v in bodies[0].items() if k not in _PER_PROMPT}
    for b in bodies[1:]:
        other = {k: v for k, v in b.items() if k not in _PER_PROMPT}
        if other != shared:
            differ = sorted(k for k in {*other, *shared} if other.get(k) != shared.get(k))
            raise ProtocolError(
                f"requests of one batch differ in {differ}; only input_ids/text, "
                "sampling_params and rid may differ"
            )
    key = "input_ids" if "input_ids" in bodies[0] else "text"
    return {
        "rid": [b["rid"] for b in bodies],
        key: [b[key] for b in bodies],
        "sampling_params": [b["sampling_params"] for b in bodies],
        **shared,
    }


def parse_generate_output(
    payload: Any,
    request: GenerateRequest,
    routed_experts_shape: tuple[int, int] | None = None,
) -> GenerateOutput:
    """Parse one ``/generate`` response, checking it holds what ``request`` asked for.

    Args:
        payload: the decoded JSON object (not a batch list).
        request: the request it answers.
        routed_experts_shape: (num_hidden_layers, num_experts_per_tok) of the served model;
            required when the request asked for routed experts.

    Raises:
        ProtocolError: naming the missing or inconsistent field.
    """
    if not isinstance(payload, Mapping) or not isinstance(payload.get("meta_info"), Mapping):
        raise ProtocolError(f"/generate response is not an object with meta_info: {payload!r:.200}")
    meta = payload["meta_info"]
    rid = str(meta.get("id", request.rid))
    if "output_ids" not in payload:
        raise ProtocolError(f"/generate response for rid={rid} lacks output_ids")
    output_ids = np.asarray(payload["output_ids"], dtype=np.int64).reshape(-1)
    finish = FinishReason.from_json(meta.get("finish_reason"))
    aborted = finish is not None and finish.type == "abort"
    prompt_tokens = int(meta.get("prompt_tokens", 0))
    completion_tokens = int(meta.get("completion_tokens", len(output_ids)))
    in_session = request.session_params is not None  # prompt_tokens counts the whole context
    if request.input_ids is not None and not in_session and prompt_tokens != len(request.input_ids):
        raise ProtocolError(
            f"rid={rid}: server reports {prompt_tokens} prompt tokens, request sent "
            f"{len(request.input_ids)}"
        )
    if completion_tokens != len(output_ids):
        raise ProtocolError(
            f"rid={rid}: completion_tokens={completion_tokens} but {len(output_ids)} output_ids"
        )
    spans = tuple(
        WeightVersionSpan(str(s["version"]), int(s["start"]), int(s["end"]))
        for s in meta.get("weight_versions") or ()
    )
    version = meta.get("weight_version")
    parsed: dict[str, Any] = {}

    if request.return_logprob:
        out_lp, out_ids = _logprob_entries(
            _require(meta, "output_token_logprobs", "return_logprob", rid), "output_token_logprobs"
        )
        if len(out_lp) != len(output_ids) or not np.array_equal(out_ids, output_ids):
            raise ProtocolError(
                f"rid={rid}: output_token_logprobs cover token ids {out_ids.tolist()[:8]}... "
                f"({len(out_ids)}), output_ids are {output_ids.tolist()[:8]}... ({len(output_ids)})"
            )
        if np.isnan(out_lp).any():
            raise ProtocolError(f"rid={rid}: null log-prob among output_token_logprobs")
        parsed["output_logprobs"] = out_lp
        k = request.top_logprobs_num
        if k:
            parsed["output_top_logprobs"], parsed["output_top_ids"] = _top_entries(
                _require(meta, "output_top_logprobs", "top_logprobs_num", rid),
                k,
                "output_top_logprobs",
            )
            if len(parsed["output_top_logprobs"]) != len(output_ids):
                raise ProtocolError(f"rid={rid}: output_top_logprobs rows != output tokens")
        start = request.logprob_start_len
        if start is not None and start >= 0:
            in_lp, in_ids = _logprob_entries(
                _require(meta, "input_token_logprobs", "logprob_start_len", rid),
                "input_token_logprobs",
            )
            expected = prompt_tokens - start
            if len(in_lp) != expected:
                raise ProtocolError(
                    f"rid={rid}: {len(in_lp)} input_token_logprobs, expected prompt_tokens - "
                    f"logprob_start_len = {prompt_tokens} - {start} = {expected}"
                )
            if (
                request.input_ids is not None
                and not in_session
                and in_ids.tolist() != list(request.input_ids[start:])
            ):
                raise ProtocolError(f"rid={rid}: input_token_logprobs are for other token ids")
            parsed["input_logprobs"], parsed["input_token_ids"] = in_lp, in_ids
            if k:
                parsed["input_top_logprobs"], parsed["input_top_ids"] = _top_entries(
                    _require(meta, "input_top_logprobs", "top_logprobs_num", rid),
                    k,
                    "input_top_logprobs",
                )
                if len(parsed["input_top_logprobs"]) != expected:
                    raise ProtocolError(f"rid={rid}: input_top_logprobs rows != {expected}")

    if request.return_routed_experts and not (aborted and meta.get("routed_experts") is None):
        if routed_experts_shape is None:
            raise ProtocolError(
                "routed experts were requested but the model's (num_hidden_layers, "
                "num_experts_per_tok) is unknown: pass routed_experts_shape"
            )
        routes_TLk = decode_routed_experts(
            _require(meta, "routed_experts", "return_routed_experts", rid), *routed_experts_shape
        )
        expected = prompt_tokens + len(output_ids) - 1 - request.routed_experts_start_len
        if len(routes_TLk) != expected:
            raise ProtocolError(
                f"rid={rid}: routed experts cover {len(routes_TLk)} positions, expected "
                f"prompt + output - 1 - routed_experts_start_len = {expected}"
            )
        parsed["routed_experts"] = routes_TLk

    return GenerateOutput(
        rid=rid,
        text=payload.get("text"),
        output_ids=_readonly(output_ids),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=int(meta.get("cached_tokens", 0) or 0),
        finish_reason=finish,
        weight_version=None if version is None else str(version),
        weight_version_spans=spans,
        **{key: _readonly(value) for key, value in parsed.items()},
    )


@dataclass(frozen=True, eq=False)
class ScoreOutput:
    """Log-probs a model assigns to a given response (prefill-only scoring).

    Attributes:
        logprobs: float32 [N], log p(response[i] | prompt, response[:i]).
        top_logprobs / top_ids: float32 / int64 [N, K] at the same positions, when asked.
        weight_version: the version of the weights that scored.
    """

    logprobs: np.ndarray
    top_logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    weight_version: str | None = None


def parse_score_output(output: GenerateOutput, request: GenerateRequest) -> ScoreOutput:
    """Cut the response positions out of a ``make_score_request`` answer."""
    if output.input_logprobs is None or request.logprob_start_len is None:
        raise ProtocolError("not a scoring response: it has no input log-probs")
    if output.aborted:
        raise ProtocolError(f"scoring request {output.rid} was aborted: {output.finish_reason}")
    # Entry 0 is the last prompt token (null log-prob); entries 1.. are the response tokens.
    logprobs = output.input_logprobs[1:]
    if np.isnan(logprobs).any():
        raise ProtocolError(f"rid={output.rid}: null log-prob among the scored response tokens")
    top_lp = None if output.input_top_logprobs is None else output.input_top_logprobs[1:]
    top_ids = None if output.input_top_ids is None else output.input_top_ids[1:]
    return ScoreOutput(
        logprobs=logprobs,
        top_logprobs=top_lp,
        top_ids=top_ids,
        weight_version=output.weight_version,
    )


@dataclass(frozen=True)
class ModelInfo:
    """``GET /get_model_info`` (SGLang's ``/model_info``)."""

    model_path: str
    tokenizer_path: str | None
    is_generation: bool
    weight_version: str | None
    extra: Mapping[str, Any] = field(default_factory=dict)


def parse_model_info(payload: Any) -> ModelInfo:
    if not isinstance(payload, Mapping) or "model_path" not in payload:
        raise ProtocolError(f"/get_model_info answered {payload!r:.200}, expected model_path")
    known = {"model_path", "tokenizer_path", "is_generation", "weight_version"}
    version = payload.get("weight_version")
    return ModelInfo(
        model_path=str(payload["model_path"]),
        tokenizer_path=payload.get("tokenizer_path"),
        is_generation=bool(payload.get("is_generation", True)),
        weight_version=None if version is None else str(version),
        extra={k: v for k, v in payload.items() if k not in known},
    )
