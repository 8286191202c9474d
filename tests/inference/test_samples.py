"""One generate output -> a RolloutSample: token versions from the weight-version spans,
routes narrowed to the MoE layers, the finish reason, and a clear error without log-probs."""

from __future__ import annotations

import numpy as np
import pytest

from mopd.inference.protocol import FinishReason, GenerateOutput, WeightVersionSpan
from mopd.inference.samples import output_routes, to_rollout_sample, token_versions
from mopd.models.moe import MoELayout
from mopd.types import Prompt

LAYOUT = MoELayout(num_hidden_layers=3, moe_layer_ids=(1, 2), num_experts=8, top_k=2)
PROMPT = Prompt("p", "src", "arith", np.array([5, 6, 7]))


def _output(n: int = 4, *, spans=(), logprobs: bool = True, routes: bool = True, finish="length"):
    rng = np.random.default_rng(0)
    rows = len(PROMPT.input_ids_P) + n - 1
    return GenerateOutput(
        rid="r",
        text="abcd",
        output_ids=np.arange(10, 10 + n),
        prompt_tokens=3,
        completion_tokens=n,
        cached_tokens=0,
        finish_reason=FinishReason(finish) if finish else None,
        weight_version="3",
        weight_version_spans=tuple(spans),
        output_logprobs=np.full(n, -0.5, dtype=np.float32) if logprobs else None,
        routed_experts=rng.integers(0, 8, (rows, 3, 2)).astype(np.int32) if routes else None,
    )


def test_token_versions_follow_the_spans():
    out = _output(spans=[WeightVersionSpan("2", 0, 1), WeightVersionSpan("3", 1, 4)])
    versions = token_versions(out, version=9)
    assert versions.dtype == np.int32 and versions.tolist() == [2, 3, 3, 3]
    assert token_versions(_output(), version=9).tolist() == [9, 9, 9, 9]
    # A span whose version is not an integer leaves the request's version.
    assert token_versions(_output(spans=[WeightVersionSpan("v-x", 0, 2)]), 1).tolist() == [1] * 4


def test_routes_keep_the_moe_layers_only():
    out = _output()
    routes = output_routes(out, LAYOUT)
    assert routes is not None and routes.dtype == np.uint8 and routes.shape == (6, 2, 2)
    np.testing.assert_array_equal(routes, out.routed_experts[:, [1, 2], :])
    assert output_routes(out, None) is None
    assert output_routes(_output(routes=False), LAYOUT) is None


def test_rollout_sample_from_an_output():
    s = to_rollout_sample(PROMPT, "p#0", _output(), version=3, layout=LAYOUT)
    assert s.sample_id == "p#0" and s.prompt is PROMPT and s.finish_reason == "length"
    assert s.response_ids_T.dtype == np.int32 and s.response_ids_T.tolist() == [10, 11, 12, 13]
    assert s.versions_T.tolist() == [3] * 4 and s.routes_SLk.shape == (6, 2, 2)
    assert s.text == "abcd"
    assert to_rollout_sample(PROMPT, "p#1", _output(finish=None), 0, None).finish_reason == "stop"
    with pytest.raises(ValueError, match="no log-probs for p#2"):
        to_rollout_sample(PROMPT, "p#2", _output(logprobs=False), 0, LAYOUT)
