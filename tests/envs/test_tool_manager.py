"""ToolManager on the embedded engine (over HTTP) with real sandboxes and the code-repair env.

A random tiny model never writes a valid tool call, so some turns are scripted: the test's
backend sends the scripted text as input tokens of that turn with ``max_new_tokens=1`` and
returns them (with the engine's own log-probs of them, the engine's routes, plus the one
sampled token) as the turn's output. Every token still goes through the engine's session,
and the other turns are sampled by the engine. What the server saw is recorded at the HTTP
layer of the server itself; routes and log-probs are checked against a plain transformers
forward over the stored token ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

import numpy as np
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.agentic import CodeRepairEnv
from envs.sandbox import SandboxLimits
from envs.tool_manager import NO_TOOL_CALL, AgentFormat, ToolManager, ToolManagerConfig
from envs.toolbox import Toolbox, ToolboxConfig
from mopd.inference.client import EngineClient
from mopd.inference.protocol import GenerateOutput, GenerateRequest
from mopd.models.moe import moe_layout
from mopd.models.tiny import build_tiny_checkpoint
from mopd.types import Prompt
from rollout.engine import Engine, EngineConfig
from rollout.server import build_app
from tests.inference.sglang_standin import free_port

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # The agent prompt (tool specs) is ~1k byte-level tokens: a longer context than the default.
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("agent") / "mimo", "mimo_v2_flash", seed=0,
        max_position_embeddings=4096,
    )  # fmt: skip


def _recording(app, log: list):
    """ASGI wrapper: every /generate body the server received and answered, in order."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/generate":
            return await app(scope, receive, send)
        body, answer = [], []

        async def recv():
            message = await receive()
            body.append(message.get("body", b""))
            return message

        async def snd(message):
            if message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
            await send(message)

        await app(scope, recv, snd)
        log.append((json.loads(b"".join(body)), json.loads(b"".join(answer))))

    return wrapped


@pytest.fixture(scope="module")
def server(ckpt):
    """The embedded engine's HTTP server on a loopback port; yields (url, /generate log)."""
    engine = Engine(
        EngineConfig(
            model_path=str(ckpt), dtype="float32", enable_return_routed_experts=True,
            random_seed=3,
        )
    )  # fmt: skip
    log: list = []
    port = free_port()
    config = uvicorn.Config(
        _recording(build_app(engine), log), host="127.0.0.1", port=port, log_level="error"
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", log
    uv.should_exit = True
    thread.join(timeout=20)


class Scripted:
    """A ``SessionBackend`` over a real client whose scripted turns are teacher-forced.

    ``script[sid]`` lists per turn None (the engine samples) or the text the turn outputs.
    """

    def __init__(self, client: EngineClient, tokenizer, scripts: dict[str, list[str | None]]):
        self.client, self.tokenizer, self.scripts = client, tokenizer, scripts
        self.turn: dict[str, int] = {}
        self.context: dict[str, int] = {}  # tokens the server holds for the session so far

    async def open_session(self, session_id=None, timeout_s=None):
        sid = await self.client.open_session(session_id, timeout_s=timeout_s)
        self.turn[sid], self.context[sid] = 0, 0
        return sid

    async def close_session(self, session_id):
        await self.client.close_session(session_id)

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        sid = request.session_params.id
        turn = self.turn[sid]
        self.turn[sid] += 1
        script = self.scripts[request.rid.split("@")[0]]
        forced_text = script[turn] if turn < len(script) else None
        if forced_text is None:
            out = await self.client.generate(request)
            self.context[sid] = out.prompt_tokens + len(out.output_ids)
            return out
        forced = self.tokenizer.encode(forced_text, add_special_tokens=False)
        start = self.context[sid] + len(request.input_ids) - 1
        out = await self.client.generate(
            dataclasses.replace(
                request,
                input_ids=request.input_ids + tuple(forced),
                sampling_params=dataclasses.replace(request.sampling_params, max_new_tokens=1),
                logprob_start_len=start,
            )
        )
        self.context[sid] = out.prompt_tokens + len(out.output_ids)
        assert np.isnan(out.input_logprobs[0]) and len(out.input_logprobs) == len(forced) + 1
        return dataclasses.replace(
            out,
            output_ids=np.concatenate([np.asarray(forced), out.output_ids]),
            output_logprobs=np.concatenate([out.input_logprobs[1:], out.output_logprobs]),
            completion_tokens=len(forced) + len(out.output_ids),
            prompt_tokens=out.prompt_tokens - len(forced),
        )


def _call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@torch.no_grad()
def _reference(ckpt, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob of each token given the ones before it [S] and router top-k [S, L, k]."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    picked, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            handles.append(
                gate.register_forward_hook(lambda _m, _i, o, i=i: picked.__setitem__(i, o[2]))
            )
    logits = model(torch.tensor([ids])).logits[0].float()
    for h in handles:
        h.remove()
    logp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    routes = np.zeros((len(ids), len(model.model.layers), 2), dtype=np.int64)
    for i, idx in picked.items():
        routes[:, i] = idx.numpy()
    return np.concatenate([[np.nan], logp.numpy()]), routes


def _prompt(task_id: str) -> Prompt:
    return Prompt(
        prompt_id=f"cr/{task_id}", source="code_repair", domain="agent", input_ids_P=[1],
        metadata={"agentic": {"env": "code_repair", "task_id": task_id}},
    )  # fmt: skip


def test_code_repair_trajectories_keep_the_servers_tokens_mask_tool_output_and_route_all(
    ckpt, server
):
    url, http_log = server
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    layout = moe_layout(ckpt)
    env = CodeRepairEnv()
    task = env.task("chunks_last_piece")
    fix = task.reference["reference_fix"][0]
    scripts = {
        # reads the code, one sampled turn, fixes it, runs the tests, finishes
        "fix": [
            _call("bash", command="cat listutil/chunks.py"),
            None,
            _call("str_replace", path=fix["path"], old=fix["old"], new=fix["new"]),
            _call("bash", command=task.test_command),
            _call("finish", answer="fixed"),
        ],
        "sampled": [],  # the engine alone: no tool call, nudged each turn, up to max_turns
    }
    config = ToolManagerConfig(max_turns=5, max_tokens_per_turn=12, temperature=1.0)

    async def main():
        box = Toolbox(ToolboxConfig(pool_size=2, health_interval_s=None))
        try:
            async with EngineClient(url, routed_experts_shape=(4, 2)) as client:
                backend = Scripted(client, tokenizer, scripts)
                manager = ToolManager(
                    backend, box, tokenizer, config, layout=layout, envs={"code_repair": env}
                )
                fixed, sampled = await asyncio.gather(
                    manager.run(_prompt(task.task_id), "fix", version=5),
                    manager.run(_prompt(task.task_id), "sampled", version=5),
                )
                return fixed, sampled, manager.metrics(), await box.stats()
        finally:
            await box.close()

    fixed, sampled, metrics, box_stats = asyncio.run(main())

    assert (fixed.finish_reason, fixed.reward) == ("stop", 1.0)
    assert (sampled.finish_reason, sampled.reward) == ("length", 0.0)
    assert metrics["agent/trajectories"] == 2 and metrics["agent/tool_calls"] == 4
    assert metrics["agent/no_tool_call"] == 1 + 5  # one sampled turn of "fix", five of "sampled"
    assert box_stats["tools"]["check"]["calls"] == 2 and box_stats["pool"]["leased"] == 0

    for sample, turns in ((fixed, 5), (sampled, 5)):
        sid = sample.sample_id
        exchanges = [(q, a) for q, a in http_log if q["rid"].startswith(f"{sid}@")]
        assert [q["rid"] for q, _ in exchanges] == [f"{sid}@t{i}" for i in range(turns)]
        # The stored ids are exactly the concatenation of what the server received and sent.
        seen = [t for q, a in exchanges for t in q["input_ids"] + a["output_ids"]]
        prompt_ids = sample.prompt.input_ids_P.tolist()
        assert prompt_ids + sample.response_ids_T.tolist() == seen
        # Each turn continued the one before on the server (request-level prefix reuse).
        for (q, _), (_, prev) in zip(exchanges[1:], exchanges[:-1]):
            assert q["session_params"]["rid"] == prev["meta_info"]["id"]
        assert [a["meta_info"]["cached_tokens"] > 0 for _, a in exchanges[1:]] == [True] * (
            turns - 1
        )
        # The mask is 0 exactly on the tokens the ToolManager sent after the first turn
        # (observations), 1 on everything the turns output (sampled or scripted).
        expected_mask = []
        for i, (q, a) in enumerate(exchanges):
            script = scripts[sid][i] if i < len(scripts[sid]) else None
            forced = len(tokenizer.encode(script, add_special_tokens=False)) if script else 0
            if i:
                expected_mask += [0] * (len(q["input_ids"]) - forced)
            expected_mask += [1] * (forced + len(a["output_ids"]))
        assert sample.loss_mask_T.tolist() == expected_mask
        masked_text = tokenizer.decode(sample.response_ids_T[sample.loss_mask_T == 0])
        assert masked_text.count("<tool_response>") == turns - 1
        assert sample.logp_rollout_T[sample.loss_mask_T == 0].tolist() == [0.0] * (
            len(expected_mask) - sum(expected_mask)
        )
        assert set(sample.versions_T.tolist()) == {5}
        # Routes: one row per position the engine ran (S - 1), equal to a plain forward's.
        logp_ref, routes_ref = _reference(ckpt, seen)
        s = len(seen)
        assert sample.routes_SLk.shape == (s - 1, len(layout.moe_layer_ids), layout.top_k)
        np.testing.assert_array_equal(
            sample.routes_SLk, routes_ref[: s - 1, list(layout.moe_layer_ids)]
        )
        gen = np.flatnonzero(sample.loss_mask_T) + len(prompt_ids)
        np.testing.assert_allclose(
            sample.logp_rollout_T[sample.loss_mask_T == 1], logp_ref[gen], atol=2e-4
        )

    # The tool output is in the masked part: the file's code and the test run's verdict.
    masked = tokenizer.decode(fixed.response_ids_T[fixed.loss_mask_T == 0])
    assert "def chunks(items, size):" in masked and "OK" in masked
    assert NO_TOOL_CALL in masked
    assert "def chunks" not in tokenizer.decode(fixed.response_ids_T[fixed.loss_mask_T == 1])


def test_timeouts_become_observations_or_end_the_trajectory_with_reward_0(ckpt, server):
    url, _ = server
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    env = CodeRepairEnv()
    task = env.task("slugify_case")
    fix = task.reference["reference_fix"][0]
    scripts = {
        "slow": [
            _call("str_replace", path=fix["path"], old=fix["old"], new=fix["new"]),
            _call("bash", command="sleep 5"),
            '<tool_call>{"name": "bash", "arguments": {"command": 1}}</tool_call>',
            _call("finish", answer="done"),
        ],
        "stuck": [None],
    }

    async def main():
        box = Toolbox(
            ToolboxConfig(
                pool_size=2, limits=SandboxLimits(wall_seconds=20.0), health_interval_s=None
            )
        )
        try:
            async with EngineClient(url, routed_experts_shape=(4, 2)) as client:
                backend = Scripted(client, tokenizer, scripts)
                tools = ToolManager(
                    backend, box, tokenizer,
                    ToolManagerConfig(max_turns=5, max_tokens_per_turn=4, tool_timeout_s=1.0),
                    layout=moe_layout(ckpt), envs={"code_repair": env},
                )  # fmt: skip
                slow = await tools.run(_prompt(task.task_id), "slow")
                stuck_tools = ToolManager(
                    backend, box, tokenizer,
                    ToolManagerConfig(max_tokens_per_turn=200, turn_timeout_s=0.05),
                    layout=moe_layout(ckpt), envs={"code_repair": env},
                )  # fmt: skip
                stuck = await stuck_tools.run(_prompt(task.task_id), "stuck")
                return slow, stuck, tools.metrics(), stuck_tools.metrics()
        finally:
            await box.close()

    slow, stuck, metrics, stuck_metrics = asyncio.run(main())
    # The tool timeout and the malformed call were observations; the fix still counts.
    assert (slow.finish_reason, slow.reward) == ("stop", 1.0)
    masked = tokenizer.decode(slow.response_ids_T[slow.loss_mask_T == 0])
    assert "tool 'bash' timed out after 1 s" in masked
    assert "argument 'command' must be a string" in masked
    assert metrics["agent/tool_timeouts"] == 1 and metrics["agent/parse_errors"] == 1
    # A turn past its time ends the trajectory with reward 0 and no tokens of that turn.
    assert (stuck.finish_reason, stuck.reward) == ("length", 0.0)
    assert stuck.response_ids_T.size == 0 and stuck.routes_SLk is None
    assert stuck_metrics["agent/turn_timeouts"] == 1


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_segments_equal_the_rendered_conversation(ckpt):
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    tokenizer.chat_template = CHATML
    fmt = AgentFormat(tokenizer, system_prompt="sys")
    text, prompt_ids = fmt.prompt("do it")
    assert text == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\ndo it<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    full = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "do it"},
            {"role": "assistant", "content": "call"},
            {"role": "tool", "content": "out1"},
            {"role": "tool", "content": "out2"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    # The model ended its turn with the close marker, or stopped before it: either way the
    # appended ids complete the same conversation, and nothing before them is re-tokenised.
    for turn in ("call<|im_end|>", "call<|im_", "call"):
        turn_ids = tokenizer.encode(turn, add_special_tokens=False)
        ids = prompt_ids + turn_ids + fmt.observation_ids(turn_ids, ["out1", "out2"])
        assert ids == tokenizer.encode(full, add_special_tokens=False), turn
    plain = AgentFormat(AutoTokenizer.from_pretrained(ckpt), system_prompt="sys")
    assert plain.prompt("do it")[0] == "<|system|>\nsys\n<|user|>\ndo it\n<|assistant|>\n"
    assert tokenizer.decode(
        plain.observation_ids([5], ["<tool_response>\nx\n</tool_response>"])
    ) == ("\n<|tool|>\n<tool_response>\nx\n</tool_response>\n<|assistant|>\n")


class StuckRelease(Toolbox):
    """A real Toolbox whose ``release`` never returns (until the test ends): what the end of
    a trajectory must not wait on without a bound."""

    unblock: asyncio.Event | None = None

    async def release(self, lease):
        assert self.unblock is not None
        await self.unblock.wait()
        await super().release(lease)


def test_a_release_that_never_returns_does_not_hold_the_trajectory(ckpt, server):
    url, _ = server
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    env = CodeRepairEnv()
    task = env.task("slugify_case")
    scripts = {"done": [_call("finish", answer="done")]}

    async def main():
        box = StuckRelease(ToolboxConfig(pool_size=1, health_interval_s=None))
        box.unblock = asyncio.Event()
        try:
            async with EngineClient(url, routed_experts_shape=(4, 2)) as client:
                tools = ToolManager(
                    Scripted(client, tokenizer, scripts), box, tokenizer,
                    ToolManagerConfig(max_turns=2, max_tokens_per_turn=4, release_timeout_s=0.5),
                    layout=moe_layout(ckpt), envs={"code_repair": env},
                )  # fmt: skip
                t0 = time.monotonic()
                sample = await asyncio.wait_for(tools.run(_prompt(task.task_id), "done"), 60)
                return sample, time.monotonic() - t0, tools.metrics()
        finally:
            box.unblock.set()
            await box.close()

    sample, took, metrics = asyncio.run(main())
    assert (sample.finish_reason, sample.reward) == ("stop", 0.0)  # unfixed: the tests fail
    assert took < 30.0
    assert metrics["agent/release_timeouts"] == 1 and metrics["agent/trajectories"] == 1
