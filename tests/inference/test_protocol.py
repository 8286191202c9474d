"""The SGLang protocol: request schema, response parsing, routed-experts wire format."""

from __future__ import annotations

import base64
import copy
import dataclasses

import numpy as np
import pytest

from mopd.inference import protocol as P
from mopd.inference.sglang_schema import (
    GENERATE_REQ_INPUT_FIELDS,
    GENERATE_RESPONSE_FIELDS,
    HTTP_ROUTES,
    META_INFO_FIELDS,
    ROUTE_BODY_FIELDS,
    SAMPLING_PARAMS_FIELDS,
    SESSION_PARAMS_FIELDS,
    SGLANG_VERSION,
)

# ------------------------------------------------------------------------------------------
# Request schema: everything the client can emit is a field of SGLang's published schema.
# ------------------------------------------------------------------------------------------

FULL_SAMPLING = P.SamplingParams(
    max_new_tokens=7,
    temperature=0.8,
    top_p=0.9,
    top_k=20,
    min_p=0.05,
    stop=("\n\n",),
    stop_token_ids=(2, 3),
    min_new_tokens=1,
    ignore_eos=True,
    skip_special_tokens=False,
    spaces_between_special_tokens=False,
    no_stop_trim=True,
    frequency_penalty=0.1,
    presence_penalty=0.2,
    repetition_penalty=1.1,
    sampling_seed=11,
)

FULL_REQUEST = P.GenerateRequest(
    input_ids=(1, 2, 3, 4),
    sampling_params=FULL_SAMPLING,
    rid="r-1",
    return_logprob=True,
    logprob_start_len=1,
    top_logprobs_num=3,
    token_ids_logprob=(5, 6),
    return_text_in_logprobs=True,
    return_routed_experts=True,
    routed_experts_start_len=2,
)


def test_schema_is_from_the_sglang_version_we_read():
    assert SGLANG_VERSION == "0.5.23"
    # A few names whose meaning the client depends on, as SGLang spells them.
    assert {"return_routed_experts", "routed_experts_start_len", "logprob_start_len"} <= (
        GENERATE_REQ_INPUT_FIELDS
    )
    assert "sampling_seed" in SAMPLING_PARAMS_FIELDS and "seed" not in SAMPLING_PARAMS_FIELDS


def test_every_sampling_param_field_is_in_sglang_schema():
    names = {f.name for f in dataclasses.fields(P.SamplingParams)}
    assert names <= SAMPLING_PARAMS_FIELDS, names - SAMPLING_PARAMS_FIELDS
    assert set(FULL_SAMPLING.to_json()) == names  # all set -> all emitted


def test_every_generate_field_is_in_sglang_schema():
    session = P.SessionParams(id="s", rid="r")
    body = dataclasses.replace(FULL_REQUEST, session_params=session).to_json()
    assert set(body) <= GENERATE_REQ_INPUT_FIELDS, set(body) - GENERATE_REQ_INPUT_FIELDS
    emitted = set(body) | {"text"}
    assert emitted == {f.name for f in dataclasses.fields(P.GenerateRequest)}
    assert body["sampling_params"]["stop"] == ["\n\n"]
    assert body["input_ids"] == [1, 2, 3, 4]


def test_unset_fields_are_omitted():
    body = P.GenerateRequest(input_ids=[5, 6], rid="x").to_json()
    assert body == {"rid": "x", "input_ids": [5, 6], "sampling_params": {"max_new_tokens": 128}}


@pytest.mark.parametrize(
    "request_body",
    [
        P.UpdateWeightsFromDisk("ckpt", load_format="safetensors", weight_version="3"),
        P.UpdateWeightsFromTensor(
            (b"\x00\x01", b"rank1"), load_format="direct", weight_version="3"
        ),
        P.UpdateWeightsFromDistributed(
            ("w",), ("torch.bfloat16",), ((2, 3),), load_format="x", weight_version="3"
        ),
        P.InitWeightsUpdateGroup("10.0.0.1", 29500, 1, 3, group_name="g", backend="gloo"),
        P.DestroyWeightsUpdateGroup("g"),
        P.UpdateWeightVersion("4", abort_all_requests=True),
    ],
    ids=lambda r: type(r).__name__,
)
def test_weight_bodies_use_sglang_fields_and_routes(request_body):
    body = request_body.to_json()
    assert request_body.route in HTTP_ROUTES and "POST" in HTTP_ROUTES[request_body.route]
    assert set(body) <= ROUTE_BODY_FIELDS[request_body.route]
    # Every field we set is sent (nothing silently dropped).
    assert set(body) == {f.name for f in dataclasses.fields(request_body)}


def test_tensor_payloads_are_base64_and_dtypes_plain_names():
    body = P.UpdateWeightsFromTensor((b"\x00\xff",)).to_json()
    assert base64.b64decode(body["serialized_named_tensors"][0]) == b"\x00\xff"
    dist = P.UpdateWeightsFromDistributed(("a", "b"), ("torch.float32", "bfloat16"), ((1,), (2, 2)))
    assert dist.to_json()["dtypes"] == ["float32", "bfloat16"]
    assert dist.to_json()["shapes"] == [[1], [2, 2]]


def test_client_routes_exist_in_sglang():
    used = {
        "/generate": "POST",
        "/abort_request": "POST",
        "/flush_cache": "POST",
        "/health": "GET",
        "/health_generate": "GET",
        "/get_model_info": "GET",
        "/get_server_info": "GET",
        "/release_memory_occupation": "POST",
        "/resume_memory_occupation": "POST",
        "/pause_generation": "POST",
        "/continue_generation": "POST",
        "/open_session": "POST",
        "/close_session": "POST",
    }
    for route, method in used.items():
        assert method in HTTP_ROUTES[route], route
    assert {"mode"} <= ROUTE_BODY_FIELDS["/pause_generation"]
    assert {"tags"} <= ROUTE_BODY_FIELDS["/release_memory_occupation"]
    assert {"rid", "abort_all"} <= ROUTE_BODY_FIELDS["/abort_request"]
    assert {"capacity_of_str_len", "session_id", "timeout"} <= ROUTE_BODY_FIELDS["/open_session"]
    assert {"session_id"} <= ROUTE_BODY_FIELDS["/close_session"]


def test_session_params_are_sglang_fields():
    full = P.SessionParams(id="s", rid="r", offset=3, replace=True, drop_previous_output=False)
    body = P.GenerateRequest(input_ids=(), session_params=full).to_json()
    assert "session_params" in GENERATE_REQ_INPUT_FIELDS
    assert set(body["session_params"]) == {f.name for f in dataclasses.fields(full)}
    assert set(body["session_params"]) <= SESSION_PARAMS_FIELDS
    assert P.SessionParams(id="s").to_json() == {"id": "s"}
    # positions of a session request count from the session's first token: not bounded here
    P.GenerateRequest(input_ids=(5,), return_logprob=True, logprob_start_len=9, session_params=full)
    with pytest.raises(P.ProtocolError, match="empty"):
        P.GenerateRequest(input_ids=(), session_params=P.SessionParams(id="s"))
    with pytest.raises(P.ProtocolError, match="offset"):
        P.SessionParams(id="s", offset=-1)
    with pytest.raises(P.ProtocolError, match="session id"):
        P.SessionParams(id="")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of input_ids or text"),
        ({"input_ids": [1], "text": "a"}, "exactly one"),
        ({"input_ids": []}, "empty"),
        ({"input_ids": [1.5]}, "ints"),
        ({"input_ids": [1], "top_logprobs_num": 2}, "return_logprob=True"),
        ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 3}, "exceeds"),
        ({"input_ids": [1], "return_routed_experts": True, "routed_experts_start_len": 2}, "start"),
    ],
)
def test_bad_requests_name_the_problem(kwargs, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.GenerateRequest(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": -0.1}, "temperature"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.SamplingParams(**kwargs)


def test_score_request_is_prefill_only_from_last_prompt_token():
    req = P.make_score_request(np.array([7, 8, 9]), [10, 11])
    assert req.input_ids == (7, 8, 9, 10, 11)
    assert req.sampling_params.max_new_tokens == 0
    assert req.return_logprob and req.logprob_start_len == 2
    with pytest.raises(P.ProtocolError, match="non-empty prompt"):
        P.make_score_request([], [1])


def test_init_group_rejects_rank_zero():
    with pytest.raises(P.ProtocolError, match="rank 0 is the trainer"):
        P.InitWeightsUpdateGroup("h", 1, 0, 2)


# ------------------------------------------------------------------------------------------
# Routed experts wire format
# ------------------------------------------------------------------------------------------


def test_routed_experts_round_trip_is_sglangs_int32_base64():
    rng = np.random.default_rng(0)
    routes_TLk = rng.integers(0, 300, size=(5, 4, 2))
    b64 = P.encode_routed_experts(routes_TLk)
    # SGLang's decoder: np.frombuffer(b64decode(s), dtype=np.int32), reshaped by the caller.
    flat = np.frombuffer(base64.b64decode(b64), dtype=np.int32)
    assert flat.size == 5 * 4 * 2
    np.testing.assert_array_equal(flat.reshape(5, 4, 2), routes_TLk)
    decoded = P.decode_routed_experts(b64, num_layers=4, top_k=2)
    assert decoded.dtype == np.int32 and decoded.shape == (5, 4, 2)
    np.testing.assert_array_equal(decoded, routes_TLk)


def test_routed_experts_decode_rejects_wrong_shape_and_garbage():
    b64 = P.encode_routed_experts(np.zeros((3, 4, 2), dtype=np.int64))
    with pytest.raises(P.ProtocolError, match="num_layers"):
        P.decode_routed_experts(b64, num_layers=5, top_k=2)
    with pytest.raises(P.ProtocolError, match="base64"):
        P.decode_routed_experts("not base64!", 1, 1)
    with pytest.raises(P.ProtocolError, match=r"\[T, L, k\]"):
        P.encode_routed_experts(np.zeros((3, 4)))
    assert P.decode_routed_experts("", 4, 2).shape == (0, 4, 2)


def test_compact_routes_drops_dense_layers_and_narrows():
    routes_TLk = np.arange(2 * 4 * 2, dtype=np.int32).reshape(2, 4, 2) % 8
    routes_TLk[:, 0] = -1  # a dense layer: whatever the capture buffer held
    small = P.compact_routes(routes_TLk, moe_layer_ids=[1, 3], num_experts=8)
    assert small.dtype == np.uint8 and small.shape == (2, 2, 2)
    np.testing.assert_array_equal(small, routes_TLk[:, [1, 3]])
    wide = P.compact_routes(routes_TLk + 250, moe_layer_ids=[1, 2, 3], num_experts=300)
    assert wide.dtype == np.uint16
    np.testing.assert_array_equal(wide, routes_TLk[:, 1:] + 250)
    with pytest.raises(P.ProtocolError, match="lie in"):
        P.compact_routes(routes_TLk, moe_layer_ids=[0, 1], num_experts=8)
    with pytest.raises(P.ProtocolError, match="out of range"):
        P.compact_routes(routes_TLk, moe_layer_ids=[4], num_experts=8)
    with pytest.raises(P.ProtocolError, match="ascending"):
        P.compact_routes(routes_TLk, moe_layer_ids=[3, 1], num_experts=8)


# ------------------------------------------------------------------------------------------
# Response parsing on a response in SGLang's recorded shape
# ------------------------------------------------------------------------------------------

ROUTES_TLk = np.arange(5 * 2 * 2, dtype=np.int32).reshape(5, 2, 2) % 4
# Prompt [1, 2, 3, 4], two output tokens [11, 12], logprob_start_len=1, top 2,
# routed_experts_start_len=0 -> routes for seqlen - 1 = 5 positions.
SGLANG_RESPONSE = {
    "text": " a b",
    "output_ids": [11, 12],
    "meta_info": {
        "id": "r-1",
        "finish_reason": {"type": "length", "length": 2},
        "prompt_tokens": 4,
        "weight_version": "7",
        "num_retractions": 0,
        "input_token_logprobs": [[None, 2, None], [-0.5, 3, None], [-0.25, 4, None]],
        "output_token_logprobs": [[-1.0, 11, None], [-2.0, 12, None]],
        "output_token_logprobs_length": 2,
        "input_top_logprobs": [
            None,
            [[-0.1, 3, None], [-2.0, 9, None]],
            [[-0.2, 4, None], [-3.0, 9, None]],
        ],
        "output_top_logprobs": [
            [[-0.3, 11, None], [-1.3, 1, None]],
            [[-0.4, 0, None], [-2.0, 12, None]],
        ],
        "reasoning_tokens": 0,
        "completion_tokens": 2,
        "cached_tokens": 1,
        "weight_versions": [
            {"version": "6", "start": 0, "end": 1},
            {"version": "7", "start": 1, "end": 2},
        ],
        "e2e_latency": 0.01,
        "routed_experts": base64.b64encode(ROUTES_TLk.tobytes()).decode(),
    },
}
REQUEST = P.GenerateRequest(
    input_ids=(1, 2, 3, 4),
    sampling_params=P.SamplingParams(max_new_tokens=2),
    rid="r-1",
    return_logprob=True,
    logprob_start_len=1,
    top_logprobs_num=2,
    return_routed_experts=True,
)


def test_fixture_uses_only_sglang_keys():
    assert set(SGLANG_RESPONSE) <= GENERATE_RESPONSE_FIELDS
    assert set(SGLANG_RESPONSE["meta_info"]) <= META_INFO_FIELDS


def test_parse_full_response():
    out = P.parse_generate_output(SGLANG_RESPONSE, REQUEST, routed_experts_shape=(2, 2))
    assert out.rid == "r-1" and out.text == " a b"
    assert out.output_ids.dtype == np.int64 and out.output_ids.tolist() == [11, 12]
    assert out.output_logprobs.dtype == np.float32
    np.testing.assert_array_equal(out.output_logprobs, [-1.0, -2.0])
    assert out.input_token_ids.tolist() == [2, 3, 4]
    assert np.isnan(out.input_logprobs[0])
    np.testing.assert_array_equal(out.input_logprobs[1:], [-0.5, -0.25])
    assert out.output_top_ids.tolist() == [[11, 1], [0, 12]]
    np.testing.assert_allclose(out.output_top_logprobs, [[-0.3, -1.3], [-0.4, -2.0]], rtol=1e-6)
    assert out.input_top_ids[0].tolist() == [-1, -1] and np.isnan(out.input_top_logprobs[0]).all()
    np.testing.assert_array_equal(out.routed_experts, ROUTES_TLk)
    assert out.finish_reason == P.FinishReason(type="length", length=2)
    assert out.weight_version == "7"
    assert out.weight_version_spans == (
        P.WeightVersionSpan("6", 0, 1),
        P.WeightVersionSpan("7", 1, 2),
    )
    assert out.cached_tokens == 1 and not out.aborted
    with pytest.raises(ValueError, match="read-only"):
        out.output_logprobs[0] = 0.0


def _without(key: str) -> dict:
    payload = copy.deepcopy(SGLANG_RESPONSE)
    del payload["meta_info"][key]
    return payload


@pytest.mark.parametrize(
    "key",
    ["output_token_logprobs", "input_token_logprobs", "output_top_logprobs", "routed_experts"],
)
def test_missing_what_was_asked_for_is_an_error(key):
    with pytest.raises(P.ProtocolError, match=key):
        P.parse_generate_output(_without(key), REQUEST, routed_experts_shape=(2, 2))


def test_not_asked_not_required():
    plain = P.GenerateRequest(input_ids=(1, 2, 3, 4), rid="r-1")
    payload = {
        "text": "",
        "output_ids": [11, 12],
        "meta_info": {
            "id": "r-1",
            "prompt_tokens": 4,
            "completion_tokens": 2,
            "finish_reason": {"type": "stop", "matched": 12},
        },
    }
    out = P.parse_generate_output(payload, plain)
    assert out.output_logprobs is None and out.routed_experts is None
    assert out.finish_reason.type == "stop" and out.finish_reason.matched == 12


def test_inconsistent_responses_are_errors():
    bad_ids = copy.deepcopy(SGLANG_RESPONSE)
    bad_ids["meta_info"]["output_token_logprobs"][1][1] = 99
    with pytest.raises(P.ProtocolError, match="output_token_logprobs cover"):
        P.parse_generate_output(bad_ids, REQUEST, routed_experts_shape=(2, 2))
    short_routes = copy.deepcopy(SGLANG_RESPONSE)
    short_routes["meta_info"]["routed_experts"] = P.encode_routed_experts(ROUTES_TLk[:4])
    with pytest.raises(P.ProtocolError, match="expected prompt"):
        P.parse_generate_output(short_routes, REQUEST, routed_experts_shape=(2, 2))
    with pytest.raises(P.ProtocolError, match="routed_experts_shape"):
        P.parse_generate_output(SGLANG_RESPONSE, REQUEST)
    wrong_prompt = copy.deepcopy(SGLANG_RESPONSE)
    wrong_prompt["meta_info"]["prompt_tokens"] = 3
    with pytest.raises(P.ProtocolError, match="prompt tokens"):
        P.parse_generate_output(wrong_prompt, REQUEST, routed_experts_shape=(2, 2))
    with pytest.raises(P.ProtocolError, match="meta_info"):
        P.parse_generate_output({"error": "x"}, REQUEST)


def test_aborted_response_may_lack_routes():
    payload = _without("routed_experts")
    payload["meta_info"]["finish_reason"] = {"type": "abort", "message": "aborted"}
    out = P.parse_generate_output(payload, REQUEST, routed_experts_shape=(2, 2))
    assert out.aborted and out.routed_experts is None
    assert out.output_ids.tolist() == [11, 12]


def test_parse_score_output_cuts_response_positions():
    req = P.make_score_request([1, 2], [3, 4], top_logprobs_num=1)
    payload = {
        "text": "",
        "output_ids": [],
        "meta_info": {
            "id": "s",
            "prompt_tokens": 4,
            "completion_tokens": 0,
            "finish_reason": {"type": "length", "length": 0},
            "output_token_logprobs": [],
            "output_top_logprobs": [],
            "input_token_logprobs": [[None, 2, None], [-0.5, 3, None], [-1.5, 4, None]],
            "input_top_logprobs": [None, [[-0.1, 7, None]], [[-0.2, 8, None]]],
        },
    }
    score = P.parse_score_output(P.parse_generate_output(payload, req), req)
    np.testing.assert_array_equal(score.logprobs, np.array([-0.5, -1.5], dtype=np.float32))
    assert score.top_ids.tolist() == [[7], [8]]


def test_finish_reason_rejects_unknown_type():
    with pytest.raises(P.ProtocolError, match="stop/length/abort"):
        P.FinishReason.from_json({"type": "eos"})


def test_model_info_and_weight_results():
    info = P.parse_model_info(
        {"model_path": "m", "weight_version": 3, "is_generation": True, "x": 1}
    )
    assert info.weight_version == "3" and info.extra == {"x": 1}
    result = P.parse_weight_update_result({"success": False, "message": "no"}, "/r")
    assert result == P.WeightUpdateResult(False, "no")
    with pytest.raises(P.ProtocolError, match="success"):
        P.parse_weight_update_result({"ok": True}, "/r")
