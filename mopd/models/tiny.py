"""Tiny random Hugging Face checkpoints for tests, benchmarks and the quickstart.

A checkpoint here is a real HF directory: ``config.json``, ``model.safetensors``,
``generation_config.json`` and a tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)
that ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` load offline. Every engine
and trainer in the project can therefore run on it exactly as on a hub model.

Tokenizers (HF ``tokenizers``, saved as ``tokenizer.json``), ids 0-2 always ``<pad>``,
``<bos>``, ``<eos>``:

- byte-level (default): ids 3-258 are the 256 bytes, no merges, so any text round-trips and
  any id sequence decodes;
- built from data (``tokenizer_texts``): ``train_char_tokenizer`` learns a character
  vocabulary from the texts with the tokenizers library's BPE trainer and no merges; id 3 is
  ``<unk>`` (characters the texts never showed), then one id per character. A model whose
  task texts use 30 characters gets a vocabulary of ~34 instead of 259, and every character
  stays one token (what spelling and digit tasks need).

Weights are drawn from ``seed`` alone (same seed, same bytes). Two choices keep numerical
tests meaningful: a wider initialisation than HF's default (logits and router scores spread
out, so batched and unbatched forward passes, whose float sums differ by ~1e-7, never flip
a greedy token or a top-k expert), and a random expert-selection bias on MiMo routers, so
the bias path (selection by ``sigmoid + bias``, weights without it) is exercised.

Architectures (``arch``):
    ``mimo_v2_flash``  MiMoV2FlashForCausalLM: layer 0 dense with full attention, MoE layers
                       with a sigmoid router and selection bias, sliding-window layers with
                       attention sinks and twice the KV heads, q/k head dim != v head dim.
    ``qwen3_moe``      Qwen3MoeForCausalLM: softmax top-k router, layer 0 dense (mlp_only_layers).
    ``mixtral``        MixtralForCausalLM: softmax top-k router on every layer.
    ``llama``          LlamaForCausalLM: dense.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["ARCHS", "build_tiny_checkpoint", "tiny_config", "train_char_tokenizer"]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_NUM_SPECIAL = 3
VOCAB_SIZE = _NUM_SPECIAL + 256


def _mimo_v2_flash(**overrides: Any):
    from transformers import MiMoV2FlashConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,  # sliding-window layers get 2
        head_dim=24,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=[
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        max_position_embeddings=512,
        initializer_range=0.1,
        attention_value_scale=0.707,
    )
    kwargs.update(overrides)
    return MiMoV2FlashConfig(**kwargs)


def _qwen3_moe(**overrides: Any):
    from transformers import Qwen3MoeConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        norm_topk_prob=True,
        max_position_embeddings=512,
        initializer_range=0.1,
    )
    kwargs.update(overrides)
    return Qwen3MoeConfig(**kwargs)


def _mixtral(**overrides: Any):
    from transformers import MixtralConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        initializer_range=0.1,
    )
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


def _llama(**overrides: Any):
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.1,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


ARCHS: dict[str, Callable[..., Any]] = {
    "mimo_v2_flash": _mimo_v2_flash,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "llama": _llama,
}


def tiny_config(arch: str = "mimo_v2_flash", **overrides: Any):
    """The transformers config of a tiny model of ``arch``; ``overrides`` replace fields."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(ARCHS)}")
    config = ARCHS[arch](**overrides)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    return config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID}
    for byte, char in sorted(_bytes_to_unicode().items()):
        vocab[char] = _NUM_SPECIAL + byte
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


UNK = "<unk>"


def train_char_tokenizer(texts: Iterable[str]) -> Any:
    """A character-level ``tokenizers.Tokenizer`` learned from ``texts``.

    The BPE trainer of the tokenizers library collects the alphabet of the texts; with the
    vocabulary capped at specials + alphabet it learns no merges, so every character is one
    token. Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the characters in
    the trainer's order. Characters outside the texts encode as ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, trainers

    texts = [t for t in texts if t]
    alphabet = set("".join(texts))
    if not alphabet:
        raise ValueError("train_char_tokenizer needs at least one non-empty text")
    specials = ["<pad>", "<bos>", "<eos>", UNK]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(alphabet),
        special_tokens=specials,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.decoder = decoders.Fuse()  # characters join without separators
    return tok


def _save_tokenizer(path: Path, tok: Any) -> None:
    from transformers import PreTrainedTokenizerFast

    special = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
    if tok.token_to_id(UNK) is not None:
        special["unk_token"] = UNK
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **special)
    fast.save_pretrained(str(path))


def _widen_routers(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Give router weights (and MiMo's selection bias) a spread that makes top-k unambiguous."""
    for name, module in model.named_modules():
        if not name.endswith("mlp.gate") or not hasattr(module, "top_k"):
            continue
        with torch.no_grad():
            weight = module.weight
            weight.copy_(torch.randn(weight.shape, generator=gen) / weight.shape[1] ** 0.5)
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))


def build_tiny_checkpoint(
    path: str | Path,
    arch: str = "mimo_v2_flash",
    seed: int = 0,
    *,
    tokenizer_texts: Iterable[str] | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random HF checkpoint of ``arch`` (fp32) with its tokenizer to ``path``.

    Args:
        path: output directory (created; existing files are overwritten).
        arch: one of ``ARCHS``.
        seed: weights are a function of the seed only.
        tokenizer_texts: texts to learn a character tokenizer from (``train_char_tokenizer``;
            the model's ``vocab_size`` follows it); None gives the byte-level tokenizer.
        **overrides: config fields to replace (e.g. ``num_hidden_layers=6``).

    Returns:
        The checkpoint directory, loadable with ``from_pretrained`` offline.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if tokenizer_texts is None:
        tok = _byte_tokenizer()
    else:
        if "vocab_size" in overrides:
            raise ValueError(
                "build_tiny_checkpoint: vocab_size comes from the tokenizer learned from "
                "tokenizer_texts; drop the vocab_size override"
            )
        tok = train_char_tokenizer(tokenizer_texts)
        overrides = {**overrides, "vocab_size": tok.get_vocab_size()}
    config = tiny_config(arch, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _widen_routers(model, torch.Generator().manual_seed(seed + 1))
    model.save_pretrained(str(path), safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(
        str(path)
    )
    _save_tokenizer(path, tok)
    (path / "mopd_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}) + "\n")
    return path
