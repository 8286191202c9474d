"""Tiny checkpoints: the tokenizer learned from data, and the model built around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.models.tiny import build_tiny_checkpoint, train_char_tokenizer

TEXTS = ["8+9-2=", "15", "rev:planet=", "tenalp", "3-7+1="]


def test_char_tokenizer_learns_one_id_per_character_of_the_data():
    tok = train_char_tokenizer(TEXTS)
    alphabet = sorted(set("".join(TEXTS)))
    vocab = tok.get_vocab()
    # <pad> <bos> <eos> <unk>, then exactly the characters the texts use.
    assert [vocab[s] for s in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    assert sorted(set(vocab) - {"<pad>", "<bos>", "<eos>", "<unk>"}) == alphabet
    assert tok.get_vocab_size() == 4 + len(alphabet)
    # No merges: every character is one token, and decoding joins them back.
    enc = tok.encode("rev:tenalp=")
    assert enc.tokens == list("rev:tenalp=")
    assert tok.decode(enc.ids) == "rev:tenalp="
    # A character the data never showed is <unk>.
    assert tok.encode("8*9").ids == [vocab["8"], 3, vocab["9"]]


def test_char_tokenizer_is_a_function_of_the_texts():
    a = train_char_tokenizer(TEXTS).get_vocab()
    b = train_char_tokenizer(list(reversed(TEXTS)) * 3).get_vocab()
    assert a == b


def test_char_tokenizer_refuses_empty_data():
    with pytest.raises(ValueError, match="non-empty text"):
        train_char_tokenizer(["", ""])


def test_checkpoint_with_data_tokenizer_loads_and_runs(tmp_path: Path):
    path = build_tiny_checkpoint(tmp_path / "m", seed=3, tokenizer_texts=TEXTS)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    n = 4 + len(set("".join(TEXTS)))
    assert len(tok) == n and model.config.vocab_size == n
    assert json.loads((path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("8+9-2=")["input_ids"]
    assert len(ids) == 6 and tok.decode(ids) == "8+9-2="
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, 6, n) and torch.isfinite(logits).all()


def test_data_tokenizer_sets_the_vocabulary_size(tmp_path: Path):
    with pytest.raises(ValueError, match="drop the vocab_size override"):
        build_tiny_checkpoint(tmp_path / "m", tokenizer_texts=TEXTS, vocab_size=300)


def test_byte_tokenizer_is_still_the_default(tmp_path: Path):
    path = build_tiny_checkpoint(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 259
    assert tok.decode(tok("héllo ✓")["input_ids"]) == "héllo ✓"
