"""Prompt sources: reasoning-gym generators (determinism, compact formats, eval split) and
jsonl / parquet files (epochs, seeded shuffles, line-precise errors), with resumable cursors."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from mopd.config.schema import DataSourceConfig, RunConfig
from mopd.scheduler.sources import (
    FileSource,
    GeneratorSource,
    SourceError,
    build_source,
)

SUM_ARGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}


def _texts(source, n: int) -> list[str]:
    return [source.next_item().text for _ in range(n)]


def test_generator_is_a_function_of_seed_name_and_index():
    a = GeneratorSource("sum", "chain_sum", SUM_ARGS, seed=0)
    b = GeneratorSource("sum", "chain_sum", SUM_ARGS, seed=0)
    first = [a.next_item() for _ in range(1200)]  # crosses a chunk boundary
    assert first == [b.next_item() for _ in range(1200)]
    assert len({item.key for item in first}) == 1200
    other_name = _texts(GeneratorSource("sum2", "chain_sum", SUM_ARGS, seed=0), 50)
    other_seed = _texts(GeneratorSource("sum", "chain_sum", SUM_ARGS, seed=1), 50)
    texts = [item.text for item in first[:50]]
    assert other_name != texts and other_seed != texts


def test_generator_items_carry_the_reasoning_gym_entry():
    item = GeneratorSource("sum", "chain_sum", SUM_ARGS, seed=3).next_item()
    info = item.metadata["reasoning_gym"]
    assert info["dataset"] == "chain_sum" and info["config"] == SUM_ARGS
    assert info["entry"]["question"] == item.text and info["entry"]["answer"] == item.answer
    json.dumps(item.metadata)  # travels through msgpack / checkpoints


def test_generator_cursor_round_trip_continues_identically():
    a = GeneratorSource("sum", "chain_sum", SUM_ARGS, seed=5, num_eval=20)
    _texts(a, 1500)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_item() for _ in range(40)]
    b = GeneratorSource("sum", "chain_sum", SUM_ARGS, seed=5, num_eval=20)
    b.load_state_dict(state)
    assert [b.next_item() for _ in range(40)] == expected
    with pytest.raises(SourceError, match="not for generator"):
        GeneratorSource("sum", "products", {}, seed=5).load_state_dict(state)


def test_eval_split_never_reaches_training():
    # One-digit sums have ~200 distinct prompts, so training draws hit eval texts often.
    args = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "format": "compact"}
    src = GeneratorSource("sum", "chain_sum", args, seed=0, num_eval=50)
    eval_texts = {item.text for item in src.eval_items()}
    assert len(src.eval_items()) == 50 and len(eval_texts) > 30
    train = set(_texts(src, 3000))
    assert not train & eval_texts
    assert src.skipped_eval_overlap > 0  # the exclusion really fired
    again = GeneratorSource("sum", "chain_sum", args, seed=0, num_eval=50)
    assert [i.text for i in again.eval_items()] == [i.text for i in src.eval_items()]


def test_eval_split_that_covers_the_task_space_fails_clearly():
    args = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    src = GeneratorSource("sum", "chain_sum", args, seed=0, num_eval=3000)
    with pytest.raises(SourceError, match="lower it or widen"):
        src.next_item()


def test_compact_formats_a_tiny_model_can_learn():
    sums = GeneratorSource("sum", "chain_sum", {**SUM_ARGS, "format": "compact"}, seed=0)
    for item in (sums.next_item() for _ in range(200)):
        assert re.fullmatch(r"\d{1,2}[+-]\d{1,2}=", item.text), item.text
        assert int(item.answer) == eval(item.text[:-1])
    rev = GeneratorSource(
        "rev", "spell_backward", {"min_word_len": 3, "max_word_len": 5, "format": "compact"}, seed=0
    )
    for item in (rev.next_item() for _ in range(100)):
        word = re.fullmatch(r"rev:(\w{3,5})=", item.text).group(1)
        assert item.answer == word[::-1]
    gcd = GeneratorSource("g", "gcd", {"format": "compact"}, seed=0).next_item()
    assert re.fullmatch(r"gcd:\d+(,\d+)+=", gcd.text)


def test_generator_config_errors_name_the_problem():
    with pytest.raises(SourceError, match="did you mean chain_sum"):
        GeneratorSource("s", "chain_sums", {}, seed=0)
    with pytest.raises(SourceError, match="no compact format for 'word_ladder'"):
        GeneratorSource("s", "word_ladder", {"format": "compact"}, seed=0)
    with pytest.raises(SourceError, match="format='short'"):
        GeneratorSource("s", "chain_sum", {"format": "short"}, seed=0)
    with pytest.raises(SourceError, match=r"rejected generator_args.*bogus"):
        GeneratorSource("s", "chain_sum", {"bogus": 1}, seed=0)
    with pytest.raises(SourceError, match="rejected generator_args"):
        GeneratorSource("s", "chain_sum", {"min_terms": 5, "max_terms": 2}, seed=0)


def _write_jsonl(path, records) -> None:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_jsonl_runs_by_epochs_with_a_seeded_shuffle(tmp_path):
    path = tmp_path / "p.jsonl"
    records = [{"prompt": f"q{i}", "answer": str(i), "metadata": {"i": i}} for i in range(7)]
    records[3] = {"text": "q3", "answer": 3}  # 'text' instead of 'prompt'; numeric answer
    _write_jsonl(path, records)
    src = FileSource("f", path, "jsonl", seed=0)
    epochs = [[src.next_item() for _ in range(7)] for _ in range(3)]
    for epoch in epochs:
        assert sorted(item.text for item in epoch) == sorted(f"q{i}" for i in range(7))
    assert [i.text for i in epochs[0]] != [i.text for i in epochs[1]]
    item3 = next(i for i in epochs[0] if i.text == "q3")
    assert item3.answer == "3" and item3.metadata == {} and item3.key == "f:row3"
    item5 = next(i for i in epochs[0] if i.text == "q5")
    assert item5.metadata == {"i": 5}
    again = FileSource("f", path, "jsonl", seed=0)
    assert [again.next_item().text for _ in range(21)] == [i.text for e in epochs for i in e]


def test_file_cursor_round_trip_mid_epoch(tmp_path):
    path = tmp_path / "p.jsonl"
    _write_jsonl(path, [{"prompt": f"q{i}"} for i in range(5)])
    a = FileSource("f", path, "jsonl", seed=1)
    _texts(a, 8)
    state = json.loads(json.dumps(a.state_dict()))
    expected = _texts(a, 12)
    b = FileSource("f", path, "jsonl", seed=1)
    b.load_state_dict(state)
    assert _texts(b, 12) == expected
    _write_jsonl(path, [{"prompt": f"q{i}"} for i in range(6)])
    with pytest.raises(SourceError, match="the file changed"):
        FileSource("f", path, "jsonl", seed=1).load_state_dict(state)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"prompt": "a"}', '{"answer": "1"}'], r"line 2: missing field 'prompt' \(or 'text'\)"),
        (['{"prompt": "a"}', "", '{"prompt": "b",'], r"line 3: not valid JSON"),
        (['{"prompt": "a", "metadata": [1]}'], r"line 1: field 'metadata' must be an object"),
        (['["a"]'], r"line 1: expected an object"),
        (['{"prompt": ""}'], r"line 1: field 'prompt' must be a non-empty string"),
        (['{"prompt": "a", "answer": {"x": 1}}'], r"line 1: field 'answer' must be a string"),
    ],
)
def test_bad_jsonl_lines_fail_with_file_line_and_field(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=match) as err:
        FileSource("f", path, "jsonl", seed=0)
    assert str(path) in str(err.value)


def test_missing_and_empty_files_fail_clearly(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        FileSource("f", tmp_path / "nope.jsonl", "jsonl", seed=0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SourceError, match="holds no prompts"):
        FileSource("f", tmp_path / "empty.jsonl", "jsonl", seed=0)


def test_parquet_source_and_its_errors(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "answer": ["1", None, "3"]}), path)
    src = FileSource("p", path, "parquet", seed=0)
    items = {item.text: item for item in (src.next_item() for _ in range(3))}
    assert set(items) == {"a", "b", "c"}
    assert items["a"].answer == "1" and items["b"].answer is None
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["a"]}), bad)
    with pytest.raises(
        SourceError, match="missing column 'prompt' \\(or 'text'\\); columns: question"
    ):
        FileSource("p", bad, "parquet", seed=0)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"prompt": ["a", None]}), nulls)
    with pytest.raises(SourceError, match="row 2: missing field 'prompt'"):
        FileSource("p", nulls, "parquet", seed=0)


def test_file_eval_split_is_disjoint_by_text(tmp_path):
    path = tmp_path / "p.jsonl"
    # 'dup' appears three times: if one copy is held out, none may be trained on.
    _write_jsonl(path, [{"prompt": t} for t in ["dup", "a", "dup", "b", "c", "dup", "d", "e"]])
    for seed in range(6):
        src = FileSource("f", path, "jsonl", seed=seed, num_eval=3)
        held = {i.text for i in src.eval_items()}
        assert len(held) == 3
        train = set(_texts(src, 3 * src.num_train))
        assert not train & held
        assert train | held == {"dup", "a", "b", "c", "d", "e"}
    with pytest.raises(SourceError, match="6 distinct prompts"):
        FileSource("f", path, "jsonl", seed=0, num_eval=6)


def test_build_source_from_omegaconf_config(tmp_path):
    yaml = """
    model: {path: m}
    data:
      sources:
        - {name: sum, domain: arith, generator: chain_sum,
            generator_args: {min_terms: 2, max_terms: 2, format: compact}}
        - {name: f, domain: general, kind: jsonl, path: prompts.jsonl}
    """
    run = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(yaml))
    _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello", "answer": "hi"}])
    gen = build_source(run.data.sources[0], seed=0)
    assert re.fullmatch(r"\d+[+-]\d+=", gen.next_item().text)
    assert build_source(run.data.sources[1], seed=0, base_dir=tmp_path).next_item().text == "hello"
    with pytest.raises(SourceError, match="needs 'path'"):
        build_source(DataSourceConfig(name="x", domain="d", kind="jsonl"), seed=0)
    with pytest.raises(SourceError, match="unknown kind 'csv'"):
        build_source(DataSourceConfig(name="x", domain="d", kind="csv"), seed=0)
