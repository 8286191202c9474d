"""ToolManager: the turn loop of one agentic rollout, inside a rollout worker.

For a prompt that names an agentic task (``Prompt.metadata["agentic"] = {"env", "task_id"}``)
``ToolManager.run`` produces one ``RolloutSample``:

1. **prompt**: a system prompt (the tool specs ``TOOL_SPECS`` and the call format) and the
   task's instruction, rendered by ``AgentFormat`` (the tokenizer's chat template when it has
   one, else the plain template documented there) and tokenised once.
2. **sandbox**: a lease from the ``Toolbox`` (a Ray actor handle or a local ``Toolbox``), its
   working directory a fresh copy of the task's files.
3. **turns**, on one engine session (``open_session``; each turn continues the previous one
   with ``SessionParams(id, rid=previous turn)``, so the server reuses the earlier turns: their
   tokens, KV cache and the routes recorded when they ran): generate; decode the turn's
   tokens and parse its tool calls (``envs.tools.parse_tool_calls``); run them in order
   through the Toolbox; append the observations, tokenised once as ids, as the next turn's
   input. Token ids are never re-tokenised: the transcript is the prompt ids followed by
   exactly the ids the server returned and the ids it was sent.
4. **end**: at ``finish`` (``finish_reason="stop"``), after ``max_turns`` turns or when the
   response budget ``max_response_tokens`` is spent (``"length"``), when a turn takes longer
   than ``turn_timeout_s`` (``"length"``, reward 0) or when the server aborts a turn
   (``"abort"``: a weight update or a cancelled group; the caller requeues the prompt). A
   trajectory always ends with a generated turn (an observation nobody will read is dropped).
5. **reward**, at once: the environment's ``reward`` in the same sandbox (code repair: the
   task's tests; tool use: the ``finish`` answer), bounded by ``reward_timeout_s`` (0 if it
   overruns or fails); then the lease is released (waited for at most ``release_timeout_s``)
   and the session closed.

The sample: ``response_ids_T`` all tokens after the prompt; ``loss_mask_T`` 1 on generated
tokens, 0 on observation (and template glue) tokens; ``logp_rollout_T`` the engine's
log-probs, 0 on observations; ``versions_T`` per generated token from the server's weight
version spans, observations taking the version of the token before them; ``routes_SLk``
(MoE models) the S - 1 rows of every position the server ran, each turn asking only for the
rows after those it already returned (``routed_experts_start_len``); ``reward`` set;
``prompt.input_ids_P`` replaced by the rendered agent prompt.

Failures never escape as exceptions from a tool: a malformed call, an unknown tool, a tool
that times out (``tool_timeout_s``) or fails, a refused quota all become error observations
the model sees, and the rollout goes on. Only what makes the trajectory impossible raises:
a prompt that names no known task (``KeyError``/``ValueError``) and a Toolbox with no free
sandbox (``ToolboxBusy``: the caller requeues the prompt).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from envs.agentic import ENVIRONMENTS, METADATA_KEY, AgenticEnv, build_env, toolbox_call
from envs.tools import TOOL_SPECS, Observation, ToolCall, format_observation, parse_tool_calls
from mopd.inference.protocol import (
    GenerateOutput,
    GenerateRequest,
    SamplingParams,
    SessionParams,
)
from mopd.inference.samples import output_routes, token_versions
from mopd.models.moe import MoELayout
from mopd.types import Prompt, RolloutSample

__all__ = [
    "PLAIN_TEMPLATE",
    "SYSTEM_PROMPT",
    "AgentFormat",
    "SessionBackend",
    "ToolManager",
    "ToolManagerConfig",
]

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You solve tasks in a Linux sandbox by calling tools. The task's files are in the "
    "working directory /workspace; there is no network.\n"
    "Tools (JSON schema):\n{tools}\n"
    "To call a tool, write one or more blocks\n"
    '<tool_call>{{"name": "<tool>", "arguments": {{...}}}}</tool_call>\n'
    "and stop; each result comes back as <tool_response>...</tool_response>. When you are "
    "done, call finish with your answer."
)
"""The system prompt; ``{tools}`` becomes one JSON line per tool of ``TOOL_SPECS``."""

PLAIN_TEMPLATE = {
    "prompt": "<|system|>\n{system}\n<|user|>\n{instruction}\n<|assistant|>\n",
    "observation": "\n<|tool|>\n{observations}\n<|assistant|>\n",
}
"""The template of a tokenizer without a chat template. The prompt is tokenised with the
tokenizer's special tokens (BOS); after each turn (which ends with whatever the model
generated last, e.g. EOS) comes the observation segment, the observations' ``<tool_response>``
blocks joined by newlines, tokenised without special tokens."""

NO_TOOL_CALL = (
    "No tool call found in your message. Call a tool as "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call>, or call finish to end.'
)
_PLACEHOLDER = "mopd-assistant-placeholder-5d1e"


def _system_prompt() -> str:
    tools = "\n".join(json.dumps(spec["function"], separators=(",", ":")) for spec in TOOL_SPECS)
    return SYSTEM_PROMPT.format(tools=tools)


class AgentFormat:
    """Turns the conversation into token ids: the prompt once, then one observation segment
    per turn, each tokenised once and appended as ids.

    With a chat template, the observation segment is the text the template adds to a
    conversation when tool messages (role ``tool``) follow an assistant message, up to the
    next assistant header; the tokens that close an assistant turn (e.g. ``<|im_end|>\\n``)
    are added first, minus those the model already generated at the end of its turn.
    Templates for which adding messages changes the text rendered before them are refused.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system = system_prompt if system_prompt is not None else _system_prompt()
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self._close_ids: list[int] = []
        if self.chat:
            base = self._render([("assistant", _PLACEHOLDER)], generation_prompt=False)
            extended = self._render(
                [("assistant", _PLACEHOLDER), ("tool", "x")], generation_prompt=True
            )
            if not extended.startswith(base) or _PLACEHOLDER not in base:
                raise ValueError(
                    "the tokenizer's chat template renders earlier messages differently once a "
                    "tool message follows, so observations cannot be appended as tokens; use a "
                    "template that only appends (ChatML/Qwen style) or none (the plain template)"
                )
            close = base[base.rindex(_PLACEHOLDER) + len(_PLACEHOLDER) :]
            self._close_ids = self._encode(close)

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def _render(self, tail: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": "u"}]
        messages += [{"role": role, "content": content} for role, content in tail]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def prompt(self, instruction: str) -> tuple[str, list[int]]:
        """(text, token ids) of the system prompt and the instruction, up to the first
        assistant header."""
        if self.chat:
            messages = [
                {"role": "system", "content": self.system},
                {"role": "user", "content": instruction},
            ]
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return text, self._encode(text)
        text = PLAIN_TEMPLATE["prompt"].format(system=self.system, instruction=instruction)
        return text, self._encode(text, special=True)

    def observation_ids(self, turn_ids: Sequence[int], observations: Sequence[str]) -> list[int]:
        """The ids appended after a turn that generated ``turn_ids``: closing tokens the
        model did not generate, the observations, the next assistant header."""
        if not self.chat:
            blocks = "\n".join(observations)
            return self._encode(PLAIN_TEMPLATE["observation"].format(observations=blocks))
        base = self._render([("assistant", _PLACEHOLDER)], generation_prompt=False)
        extended = self._render(
            [("assistant", _PLACEHOLDER), *(("tool", o) for o in observations)],
            generation_prompt=True,
        )
        close = self._close_ids
        done = next((k for k in range(len(close), 0, -1) if list(turn_ids[-k:]) == close[:k]), 0)
        return close[done:] + self._encode(extended[len(base) :])


class SessionBackend(Protocol):
    """What the ToolManager needs from the rollout servers: ``EngineClient``, ``EnginePool``
    and ``rollout.router.EngineRouter`` all provide it."""

    async def generate(self, request: GenerateRequest) -> GenerateOutput: ...

    async def open_session(
        self, session_id: str | None = None, timeout_s: float | None = None
    ) -> str: ...

    async def close_session(self, session_id: str) -> None: ...


@dataclass(frozen=True)
class ToolManagerConfig:
    """Limits and sampling of the turn loop (one per data source or run)."""

    max_turns: int = 8
    """Generated turns at most."""
    max_response_tokens: int = 4096
    """Tokens after the prompt at most (generated and observation tokens together)."""
    max_tokens_per_turn: int = 1024
    """``max_new_tokens`` of one turn (less when the response budget is nearly spent)."""
    max_observation_chars: int = 8192
    """Longer tool output is cut to its head and tail with a note, before tokenisation."""
    turn_timeout_s: float = 300.0
    """Wall time of one generation turn; past it the trajectory ends with reward 0."""
    tool_timeout_s: float = 120.0
    """Wall time of one tool call (queueing included); past it the model sees a timeout."""
    reward_timeout_s: float = 300.0
    """Wall time of the environment's reward; past it the reward is 0."""
    release_timeout_s: float = 300.0
    """How long the end of a trajectory waits for the Toolbox to take its sandbox back (the
    Toolbox bounds it too); past it the sample is returned anyway."""
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    """Stop strings of every turn (e.g. ``("</tool_call>",)``)."""
    on_no_tool_call: str = "nudge"
    """A turn with no tool call: ``nudge`` (an error observation asks for one) or ``end``."""
    session_timeout_s: float | None = None
    """Idle time after which the server closes the session (None: the server's default)."""

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_tokens_per_turn < 1 or self.max_response_tokens < 1:
            raise ValueError("max_turns, max_tokens_per_turn and max_response_tokens must be >= 1")
        if self.on_no_tool_call not in ("nudge", "end"):
            raise ValueError(
                f"on_no_tool_call must be 'nudge' or 'end', got {self.on_no_tool_call!r}"
            )
        for name in ("turn_timeout_s", "tool_timeout_s", "reward_timeout_s", "release_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ToolManagerConfig.{name} must be > 0")


@dataclass
class _Transcript:
    """Everything after the prompt, built turn by turn (then frozen into a RolloutSample)."""

    ids: list[int] = dataclasses.field(default_factory=list)
    mask: list[int] = dataclasses.field(default_factory=list)
    logp: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    routes: list[np.ndarray] = dataclasses.field(default_factory=list)

    def observe(self, ids: Sequence[int], version: int) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logp += [0.0] * len(ids)
        self.versions += [self.versions[-1] if self.versions else version] * len(ids)

    def generated(self, out: GenerateOutput, version: int) -> None:
        n = len(out.output_ids)
        versions = token_versions(out, version)  # partial rollouts: tokens of several versions
        if out.output_logprobs is None:
            raise ValueError(f"rid={out.rid}: the server returned no log-probs")
        self.ids += [int(t) for t in out.output_ids]
        self.mask += [1] * n
        self.logp += [float(x) for x in out.output_logprobs]
        self.versions += versions.tolist()


class ToolManager:
    """Runs agentic trajectories; see the module docstring.

    Args:
        backend: the rollout servers (a ``SessionBackend``).
        toolbox: a ``Toolbox`` or its Ray actor handle (shared by every rollout).
        tokenizer: the student's Hugging Face tokenizer.
        config: limits and sampling.
        layout: the student's MoE layout (routes are recorded for MoE models; None: dense).
        envs: environment name -> environment (default: every one of ``ENVIRONMENTS`` over
            its shipped tasks).
    """

    def __init__(
        self,
        backend: SessionBackend,
        toolbox: Any,
        tokenizer: Any,
        config: ToolManagerConfig | None = None,
        *,
        layout: MoELayout | None = None,
        envs: Mapping[str, AgenticEnv] | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.backend = backend
        self.toolbox = toolbox
        self.tokenizer = tokenizer
        self.config = config or ToolManagerConfig()
        self.layout = layout
        self.envs = dict(envs) if envs is not None else {n: build_env(n) for n in ENVIRONMENTS}
        self.format = AgentFormat(tokenizer, system_prompt)
        self.counts: Counter[str] = Counter()

    def metrics(self) -> dict[str, float]:
        """Counters since start: ``agent/trajectories``, ``agent/turns``, ``agent/tool_calls``,
        ``agent/tool_errors``, ``agent/parse_errors``, ``agent/turn_timeouts``,
        ``agent/tool_timeouts``, ``agent/reward_failures``, ``agent/release_timeouts``,
        ``agent/release_failures``, ``agent/finish/<reason>``."""
        return {f"agent/{k}": float(v) for k, v in sorted(self.counts.items())}

    def _task(self, prompt: Prompt):
        ref = prompt.metadata.get(METADATA_KEY)
        if not isinstance(ref, Mapping) or "env" not in ref or "task_id" not in ref:
            raise ValueError(
                f"prompt {prompt.prompt_id!r} of source {prompt.source!r} names no agentic task: "
                f"metadata[{METADATA_KEY!r}] must be {{'env': ..., 'task_id': ...}} "
                "(envs.agentic.task_records writes such records)"
            )
        env = self.envs.get(str(ref["env"]))
        if env is None:
            raise KeyError(
                f"prompt {prompt.prompt_id!r} names agentic environment {ref['env']!r}; this "
                f"ToolManager has {', '.join(sorted(self.envs))}"
            )
        return env, env.task(str(ref["task_id"]))

    async def run(self, prompt: Prompt, sample_id: str, *, version: int = 0) -> RolloutSample:
        """One trajectory of the task ``prompt`` names; ``version`` labels tokens whose
        weight version the server does not report."""
        env, task = self._task(prompt)
        prompt_text, prompt_ids = self.format.prompt(task.instruction)
        agent_prompt = dataclasses.replace(prompt, input_ids_P=prompt_ids, text=prompt_text)
        lease = await toolbox_call(self.toolbox, "acquire", str(task.files))
        self.counts["trajectories"] += 1
        try:
            sid = await self.backend.open_session(timeout_s=self.config.session_timeout_s)
            try:
                tr, reason, answer, scored = await self._turns(
                    sid, sample_id, prompt_ids, lease, version
                )
            finally:
                with contextlib.suppress(Exception):  # the server idles it out anyway
                    await self.backend.close_session(sid)
            reward = await self._reward(env, task, lease, answer) if scored else 0.0
        finally:
            await self._release(lease)
        self.counts[f"finish/{reason}"] += 1
        routes = np.concatenate(tr.routes) if tr.routes and tr.ids else None
        return RolloutSample(
            sample_id=sample_id,
            prompt=agent_prompt,
            response_ids_T=np.asarray(tr.ids, dtype=np.int32),
            logp_rollout_T=np.asarray(tr.logp, dtype=np.float32),
            versions_T=np.asarray(tr.versions, dtype=np.int32),
            finish_reason=reason,
            routes_SLk=routes,
            text=self.tokenizer.decode(tr.ids, skip_special_tokens=False),
            loss_mask_T=np.asarray(tr.mask, dtype=np.uint8),
            reward=reward,
        )

    async def _release(self, lease: str) -> None:
        """Hand the sandbox back, waiting at most ``release_timeout_s``: the sample does not
        depend on it, and the Toolbox finishes recycling the sandbox on its own."""
        timeout = self.config.release_timeout_s
        try:
            await asyncio.wait_for(toolbox_call(self.toolbox, "release", lease), timeout)
        except TimeoutError:
            self.counts["release_timeouts"] += 1
            log.warning("releasing sandbox lease %s took over %g s; not waiting", lease, timeout)
        except Exception as e:  # the Toolbox checks and replaces the sandbox on its own
            self.counts["release_failures"] += 1
            log.warning("releasing sandbox lease %s failed: %s: %s", lease, type(e).__name__, e)

    def _request(
        self, new_ids: Sequence[int], budget: int, rows: int, sid: str, parent: str | None, rid: str
    ) -> GenerateRequest:
        c = self.config
        return GenerateRequest(
            input_ids=tuple(int(t) for t in new_ids),
            sampling_params=SamplingParams(
                max_new_tokens=min(c.max_tokens_per_turn, budget),
                temperature=c.temperature,
                top_p=c.top_p,
                top_k=c.top_k,
                stop=c.stop or None,
            ),
            rid=rid,
            return_logprob=True,
            return_routed_experts=self.layout is not None,
            routed_experts_start_len=rows,
            session_params=SessionParams(id=sid, rid=parent),
        )

    async def _turns(
        self, sid: str, sample_id: str, prompt_ids: list[int], lease: str, version: int
    ) -> tuple[_Transcript, str, str | None, bool]:
        """The turn loop: (transcript, finish reason, finish answer, whether to score)."""
        c = self.config
        tr = _Transcript()
        new_ids: list[int] = prompt_ids
        parent: str | None = None
        for turn in range(c.max_turns):
            pending = len(new_ids) if turn else 0  # observation tokens this turn would add
            budget = c.max_response_tokens - len(tr.ids) - pending
            if budget <= 0:
                return tr, "length", None, True
            request = self._request(
                new_ids, budget, len(prompt_ids) + len(tr.ids) - 1 if turn else 0, sid, parent,
                f"{sample_id}@t{turn}",
            )  # fmt: skip
            self.counts["turns"] += 1
            try:
                out = await asyncio.wait_for(self.backend.generate(request), c.turn_timeout_s)
            except TimeoutError:
                self.counts["turn_timeouts"] += 1
                log.warning(
                    "%s: turn %d took over %s s; reward 0", sample_id, turn, c.turn_timeout_s
                )
                return tr, "length", None, False
            if out.aborted:
                return tr, "abort", None, False
            if turn:
                tr.observe(new_ids, version)
            tr.generated(out, version)
            routes = output_routes(out, self.layout)
            if routes is not None:
                tr.routes.append(routes)
            parent = out.rid
            observations, answer, finished = await self._act(lease, out.output_ids)
            if finished:
                return tr, "stop", answer, True
            if observations is None:  # on_no_tool_call="end"
                return tr, "stop", None, True
            texts = [format_observation(self._clip(o)) for o in observations]
            new_ids = self.format.observation_ids(list(out.output_ids), texts)
        return tr, "length", None, True

    async def _act(
        self, lease: str, turn_ids: Sequence[int]
    ) -> tuple[list[Observation] | None, str | None, bool]:
        """Run the turn's tool calls: (observations, finish answer, finished)."""
        text = self.tokenizer.decode([int(t) for t in turn_ids], skip_special_tokens=False)
        parsed = parse_tool_calls(text)
        if parsed.error is not None:
            self.counts["parse_errors"] += 1
            return [Observation(parsed.error, is_error=True)], None, False
        if not parsed.calls:
            if self.config.on_no_tool_call == "end":
                return None, None, False
            self.counts["no_tool_call"] += 1
            return [Observation(NO_TOOL_CALL, is_error=True)], None, False
        observations = []
        for call in parsed.calls:
            obs = await self._call_tool(lease, call)
            if obs.finished:
                return observations, obs.answer, True
            observations.append(obs)
        return observations, None, False

    async def _call_tool(self, lease: str, call: ToolCall) -> Observation:
        self.counts["tool_calls"] += 1
        if call.name == "finish":  # touches no sandbox: no round trip to the Toolbox
            return Observation("Finished.", finished=True, answer=str(call.arguments["answer"]))
        timeout = self.config.tool_timeout_s
        try:
            obs = await asyncio.wait_for(toolbox_call(self.toolbox, "call", lease, call), timeout)
        except TimeoutError:
            self.counts["tool_timeouts"] += 1
            obs = Observation(f"tool '{call.name}' timed out after {timeout:g} s", is_error=True)
        except Exception as e:  # a broken toolbox must not end the rollout loop
            log.warning("tool %r failed: %s: %s", call.name, type(e).__name__, e)
            obs = Observation(f"tool '{call.name}' failed: {type(e).__name__}: {e}", is_error=True)
        self.counts["tool_errors"] += obs.is_error
        return obs

    def _clip(self, obs: Observation) -> Observation:
        limit = self.config.max_observation_chars
        if len(obs.text) <= limit:
            return obs
        half = limit // 2
        cut = len(obs.text) - 2 * half
        text = f"{obs.text[:half]}\n[... {cut} characters cut ...]\n{obs.text[-half:]}"
        return dataclasses.replace(obs, text=text)

    async def _reward(self, env: AgenticEnv, task: Any, lease: str, answer: str | None) -> float:
        try:
            reward = await asyncio.wait_for(
                env.reward(task, self.toolbox, lease, answer), self.config.reward_timeout_s
            )
            return float(reward)
        except Exception as e:  # timeout or a failing check: no evidence of success
            self.counts["reward_failures"] += 1
            log.warning(
                "reward of %s/%s failed: %s: %s", env.name, task.task_id, type(e).__name__, e
            )
            return 0.0
