"""The embedded inference engine: continuous batching over a transformers causal LM.

The compute behind ``python -m rollout.server`` (SGLang's HTTP protocol), for any local
Hugging Face decoder-only model, MoE included, on CPU or one GPU. One module per part:

    requests    what a request carries and returns (SGLang's fields), and its validation
    engine      ``Engine``: the scheduling loop (admit, prefill, decode, retire) on its thread
    prefill     admitting waiting sequences, planning their forward, reading their prompts
    kv_cache    ``SlotKVCache``: one KV row per running sequence (rings for sliding layers)
    attention   the explicit per-row masks, and eager attention grouped by KV head
    slots       per-sequence scheduler state and the per-slot tensors of every step
    sampling    inverse-CDF sampling with per-request seeds, reported log-probs, stop checks
    sessions    multi-turn sessions that continue on the KV cache of their earlier turns
    weights     in-place weight updates, their version, and memory release/resume
"""

from rollout.engine.attention import GROUPED_ATTENTION, grouped_eager_attention
from rollout.engine.engine import Engine, EngineConfig
from rollout.engine.kv_cache import SlotKVCache
from rollout.engine.requests import (
    TOP_K_ALL,
    LogprobEntry,
    Output,
    Request,
    RequestError,
    SamplingParams,
    SessionParams,
)

__all__ = [
    "GROUPED_ATTENTION",
    "TOP_K_ALL",
    "Engine",
    "EngineConfig",
    "LogprobEntry",
    "Output",
    "Request",
    "RequestError",
    "SamplingParams",
    "SessionParams",
    "SlotKVCache",
    "grouped_eager_attention",
]
