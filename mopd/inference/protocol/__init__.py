"""The SGLang HTTP protocol, as typed values: requests out, parsed responses in.

Both rollout backends speak this protocol: SGLang servers in production and the project's
embedded engine server everywhere else (`python -m rollout.server`). Field names, response
shapes and the routed-experts wire format follow SGLang 0.5.23 (the PyPI wheel
``sglang-0.5.23``; files ``srt/managers/io_struct.py``, ``srt/sampling/sampling_params.py``,
``srt/entrypoints/http_server.py``, ``srt/managers/tokenizer_manager.py``,
``srt/state_capturer/{base,routed_experts}.py``). ``sglang_schema.py`` holds the field and flag
names read from that version; tests hold everything this package emits to it.

One module per seam; import the names from this package (``from mopd.inference.protocol
import GenerateRequest``):

- ``requests``: ``POST /generate`` bodies (``GenerateRequest``, ``SamplingParams``,
  ``SessionParams`` for multi-turn sessions), the batched body (``batch_json``) and prefill-only
  scoring (``make_score_request``).
- ``responses``: parsed ``/generate`` answers (``GenerateOutput``, ``FinishReason``,
  ``WeightVersionSpan``), scores cut out of them (``ScoreOutput``) and ``ModelInfo``.
- ``weights``: the weight-sync routes' bodies (``UpdateWeightsFromDisk`` and the rest of
  ``WeightUpdateRequest``) and their answer (``WeightUpdateResult``).
- ``routed_experts``: the routed-experts wire codec (R3) and ``compact_routes``.
- ``common``: ``ProtocolError`` and the JSON helpers the request types share.
"""

from mopd.inference.protocol.common import ProtocolError
from mopd.inference.protocol.requests import (
    GenerateRequest,
    SamplingParams,
    SessionParams,
    batch_json,
    batch_key,
    make_score_request,
)
from mopd.inference.protocol.responses import (
    FinishReason,
    GenerateOutput,
    ModelInfo,
    ScoreOutput,
    WeightVersionSpan,
    parse_generate_output,
    parse_model_info,
    parse_score_output,
)
from mopd.inference.protocol.routed_experts import (
    compact_routes,
    decode_routed_experts,
    encode_routed_experts,
)
from mopd.inference.protocol.weights import (
    DestroyWeightsUpdateGroup,
    InitWeightsUpdateGroup,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromTensor,
    UpdateWeightVersion,
    WeightUpdateRequest,
    WeightUpdateResult,
    parse_weight_update_result,
)

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
    "batch_key",
    "compact_routes",
    "decode_routed_experts",
    "encode_routed_experts",
    "make_score_request",
    "parse_generate_output",
    "parse_model_info",
    "parse_score_output",
    "parse_weight_update_result",
]
