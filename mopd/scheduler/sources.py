"""Prompt sources: endless, seeded, resumable streams of prompts for the data scheduler.

A source turns one ``DataSourceConfig`` into a stream of ``SourceItem`` (text, reference
answer, verifier metadata) plus a held-out evaluation split:

- ``generator``: a reasoning-gym task family (``chain_sum``, ``spell_backward``, ...). Item
  ``i`` of the training stream is a pure function of (run seed, source name, i): the index
  space is cut into chunks of ``CHUNK`` items and each chunk is a reasoning-gym dataset whose
  seed is derived from (run seed, source name, chunk). The metadata holds reasoning-gym's own
  entry so the ``reasoning_gym`` reward can call the task's ``score_answer`` on it.
- ``jsonl`` / ``parquet``: one prompt per line / row with the fields ``prompt`` (or
  ``text``), optional ``answer`` and optional ``metadata`` (an object). Every line is checked
  when the source is built, so a bad file fails at start-up with the file, line and field.
  The stream runs by epochs; each epoch is a fresh permutation seeded by (run seed, source
  name, epoch).

The eval split is ``num_eval_prompts`` prompts drawn with their own seed; every training
item whose prompt text equals an eval prompt's text is skipped, so the split never leaks
into training (for generators the skipped items are counted in ``skipped_eval_overlap``).

Prompt formats of generator sources (``generator_args.format``):

- ``question`` (default): reasoning-gym's question text.
- ``compact``: a short fixed template a tiny model can learn, e.g. chain_sum
  ``'23-60='`` -> ``'-37'``, spell_backward ``'rev:neon='`` -> ``'noen'`` and caesar_cipher
  ``'rot3:ZHOO='`` -> ``'WELL'``. The reference
  answer and the scorer stay reasoning-gym's. ``COMPACT_FORMATS`` lists the families.

Cursors: ``state_dict()`` / ``load_state_dict()`` hold the position in the stream (and
nothing that the config already determines), so a resumed run continues with exactly the
items it would have drawn next.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mopd.config.schema import DataSourceConfig

__all__ = [
    "CHUNK",
    "COMPACT_FORMATS",
    "FileSource",
    "GeneratorSource",
    "PromptSource",
    "SourceError",
    "SourceItem",
    "build_source",
    "derive_seed",
]

CHUNK = 1000
"""Items per reasoning-gym dataset chunk of a generator source."""

# Consecutive items a source may skip (eval overlap) before we call the configuration
# hopeless: with a task space smaller than the eval split the stream would spin forever.
_MAX_CONSECUTIVE_SKIPS = 10_000


class SourceError(ValueError):
    """A data source that cannot be built or read (bad config, bad file, bad line)."""


@dataclass(frozen=True)
class SourceItem:
    """One prompt of a source, before tokenisation.

    Produced by: a PromptSource. Consumed by: the DataScheduler, which tokenises it into a
    ``mopd.types.Prompt``.
    """

    key: str
    """Stable identity of the prompt inside its source (the same row in every epoch has the
    same key); the scheduler keeps its pass-rate history under this key."""
    text: str
    """Prompt text shown to the model."""
    answer: str | None = None
    """Reference answer for the verifier, if any."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable fields the verifier needs."""


class PromptSource(Protocol):
    """An endless, resumable stream of prompts with a held-out eval split."""

    name: str

    def next_item(self) -> SourceItem:
        """The next training prompt (never one of the eval prompts)."""
        ...

    def eval_items(self) -> list[SourceItem]:
        """The held-out eval prompts (the same list on every call)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The cursor: JSON-serialisable."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a cursor taken by ``state_dict`` of the same source."""
        ...


def derive_seed(*parts: object) -> int:
    """A 62-bit seed that is a stable function of ``parts`` (unlike ``hash``, the same in every
    process and Python version)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _json_safe(value: Any) -> Any:
    # Entries carry tuples and occasionally other non-JSON types; the Prompt contract says
    # metadata is JSON-serialisable (it travels through msgpack and checkpoints).
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------- generators


def _no_spaces(text: str) -> str:
    return "".join(text.split())


def _compact_letter_counting(meta: Mapping[str, Any]) -> str:
    return f"count:{meta['target_letter']}:{' '.join(meta['span'])}="


COMPACT_FORMATS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "chain_sum": lambda m: _no_spaces(m["expression"]) + "=",
    "basic_arithmetic": lambda m: _no_spaces(m["expression"]) + "=",
    "products": lambda m: _no_spaces(m["expression"]) + "=",
    "spell_backward": lambda m: f"rev:{m['word']}=",
    "gcd": lambda m: "gcd:" + ",".join(str(n) for n in m["numbers"]) + "=",
    "lcm": lambda m: "lcm:" + ",".join(str(n) for n in m["numbers"]) + "=",
    "letter_counting": _compact_letter_counting,
    "caesar_cipher": lambda m: f"rot{m['rotation']}:{m['cipher_text']}=",
}
"""Compact prompt templates per reasoning-gym family: entry metadata -> prompt text."""

PROMPT_FORMATS = ("question", "compact")


class GeneratorSource:
    """A reasoning-gym task family as an endless, deterministic prompt stream.

    Args:
        name: source name (part of every derived seed, so two sources of one family differ).
        task: reasoning-gym dataset name (``reasoning_gym.factory.DATASETS``).
        generator_args: the family's config fields, plus ``format`` (question | compact).
        seed: the run seed.
        num_eval: held-out eval prompts.
    """

    def __init__(
        self,
        name: str,
        task: str,
        generator_args: Mapping[str, Any] | None = None,
        *,
        seed: int,
        num_eval: int = 0,
    ) -> None:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        self.name = name
        self.task = task
        args = dict(generator_args or {})
        self.format = str(args.pop("format", "question"))
        self.config = args
        self._seed = seed
        self._create = reasoning_gym.create_dataset
        if task not in DATASETS:
            close = difflib.get_close_matches(task, list(DATASETS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SourceError(
                f"source {name!r}: unknown reasoning-gym task {task!r}{hint}; accepted: "
                f"{', '.join(sorted(DATASETS))}"
            )
        if self.format not in PROMPT_FORMATS:
            raise SourceError(
                f"source {name!r}: generator_args.format={self.format!r}; accepted: "
                f"{', '.join(PROMPT_FORMATS)}"
            )
        if self.format == "compact" and task not in COMPACT_FORMATS:
            raise SourceError(
                f"source {name!r}: no compact format for {task!r}; compact exists for "
                f"{', '.join(sorted(COMPACT_FORMATS))} (or use format: question)"
            )
        if num_eval < 0:
            raise SourceError(f"source {name!r}: num_eval_prompts={num_eval} must be >= 0")
        self._chunk_id = -1
        self._chunk: Any = None
        self._dataset(("probe",))  # reject bad generator_args now, not at the first draw
        self._eval = [
            self._item(self._entry(("eval", i // CHUNK), i % CHUNK), f"{name}:eval{i}")
            for i in range(num_eval)
        ]
        self._eval_texts = {item.text for item in self._eval}
        self.index = 0
        """Index of the next training item."""
        self.skipped_eval_overlap = 0
        """Training items skipped because their text is an eval prompt's."""

    def _dataset(self, tag: tuple[object, ...]) -> Any:
        try:
            return self._create(
                self.task, size=CHUNK, seed=derive_seed(self._seed, self.name, *tag), **self.config
            )
        except (TypeError, ValueError, AssertionError) as e:
            raise SourceError(
                f"source {self.name!r}: reasoning-gym {self.task!r} rejected generator_args "
                f"{self.config}: {e}"
            ) from e

    def _entry(self, chunk: tuple[str, int], offset: int) -> dict[str, Any]:
        if chunk != self._chunk_id:
            self._chunk_id, self._chunk = chunk, self._dataset(chunk)
        return self._chunk[offset]

    def _item(self, entry: Mapping[str, Any], key: str) -> SourceItem:
        meta = entry.get("metadata", {})
        text = COMPACT_FORMATS[self.task](meta) if self.format == "compact" else entry["question"]
        return SourceItem(
            key=key,
            text=text,
            answer=str(entry["answer"]),
            metadata={
                "reasoning_gym": {
                    "dataset": self.task,
                    "config": _json_safe(self.config),
                    "entry": _json_safe(dict(entry)),
                }
            },
        )

    def next_item(self) -> SourceItem:
        for _ in range(_MAX_CONSECUTIVE_SKIPS):
            i = self.index
            self.index += 1
            item = self._item(self._entry(("train", i // CHUNK), i % CHUNK), f"{self.name}:{i}")
            if item.text not in self._eval_texts:
                return item
            self.skipped_eval_overlap += 1
        raise SourceError(
            f"source {self.name!r}: {_MAX_CONSECUTIVE_SKIPS} training items in a row are eval "
            "prompts; the task space is too small for num_eval_prompts: lower it or widen "
            "generator_args"
        )

    def eval_items(self) -> list[SourceItem]:
        return list(self._eval)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "generator",
            "task": self.task,
            "index": self.index,
            "skipped_eval_overlap": self.skipped_eval_overlap,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "generator" or state.get("task") != self.task:
            raise SourceError(
                f"source {self.name!r}: checkpoint cursor {dict(state)} is not for generator "
                f"{self.task!r}; resume with the config the checkpoint was written with"
            )
        self.index = int(state["index"])
        self.skipped_eval_overlap = int(state["skipped_eval_overlap"])


# --------------------------------------------------------------------------- files


def _parse_record(record: Any, where: str) -> tuple[str, str | None, dict[str, Any]]:
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected an object with a 'prompt' field, got {record!r:.80}")
    text = record.get("prompt", record.get("text"))
    if text is None:
        raise SourceError(
            f"{where}: missing field 'prompt' (or 'text'); fields present: "
            f"{', '.join(sorted(map(str, record))) or 'none'}"
        )
    if not isinstance(text, str) or not text:
        raise SourceError(f"{where}: field 'prompt' must be a non-empty string, got {text!r:.80}")
    answer = record.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise SourceError(f"{where}: field 'answer' must be a string, got {answer!r:.80}")
        answer = str(answer)
    metadata = record.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise SourceError(f"{where}: field 'metadata' must be an object, got {metadata!r:.80}")
    return text, answer, metadata


def _read_jsonl(path: Path) -> list[tuple[str, str | None, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                    "each line must hold one JSON object"
                ) from None
            rows.append(_parse_record(record, where))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, str | None, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise SourceError(f"{path}: cannot read as parquet: {e}") from e
    if "prompt" not in table.column_names and "text" not in table.column_names:
        raise SourceError(
            f"{path}: missing column 'prompt' (or 'text'); columns: {', '.join(table.column_names)}"
        )
    return [_parse_record(rec, f"{path}, row {i + 1}") for i, rec in enumerate(table.to_pylist())]


class FileSource:
    """Prompts from a jsonl or parquet file, endless by epochs with a seeded shuffle.

    Args:
        name: source name.
        path: the file.
        kind: ``jsonl`` or ``parquet``.
        seed: the run seed.
        num_eval: rows held out for evaluation (their texts never appear in training).
    """

    def __init__(
        self, name: str, path: str | Path, kind: str, *, seed: int, num_eval: int = 0
    ) -> None:
        self.name = name
        self.path = Path(path)
        self.kind = kind
        if not self.path.is_file():
            raise SourceError(f"source {name!r}: file {self.path} does not exist; check its path")
        readers = {"jsonl": _read_jsonl, "parquet": _read_parquet}
        if kind not in readers:
            raise SourceError(f"source {name!r}: kind={kind!r} is not a file kind (jsonl, parquet)")
        self._rows = readers[kind](self.path)
        if not self._rows:
            raise SourceError(f"source {name!r}: {self.path} holds no prompts")
        self._seed = seed
        texts = {text for text, _, _ in self._rows}
        if num_eval < 0 or num_eval >= len(texts):
            raise SourceError(
                f"source {name!r}: num_eval_prompts={num_eval} must be >= 0 and leave training "
                f"prompts; {self.path} has {len(texts)} distinct prompts"
            )
        order = np.random.default_rng(derive_seed(seed, name, "eval")).permutation(len(self._rows))
        eval_rows: list[int] = []
        seen: set[str] = set()
        for row in order.tolist():
            if len(eval_rows) == num_eval:
                break
            if self._rows[row][0] not in seen:  # held-out prompts are distinct texts
                seen.add(self._rows[row][0])
                eval_rows.append(row)
        self._eval = [self._item(row, f"{name}:eval{row}") for row in eval_rows]
        self._train_rows = np.array(
            [row for row, (text, _, _) in enumerate(self._rows) if text not in seen], dtype=np.int64
        )
        self.epoch = 0
        """Current epoch (each a fresh permutation of the training rows)."""
        self.position = 0
        """Position of the next item inside the epoch's permutation."""
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(derive_seed(self._seed, self.name, "epoch", epoch))
        return rng.permutation(self._train_rows)

    def _item(self, row: int, key: str) -> SourceItem:
        text, answer, metadata = self._rows[row]
        return SourceItem(key=key, text=text, answer=answer, metadata=dict(metadata))

    @property
    def num_train(self) -> int:
        """Training prompts per epoch."""
        return int(self._train_rows.shape[0])

    def next_item(self) -> SourceItem:
        if self.position == self._order.shape[0]:
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        row = int(self._order[self.position])
        self.position += 1
        return self._item(row, f"{self.name}:row{row}")

    def eval_items(self) -> list[SourceItem]:
        return list(self._eval)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "epoch": self.epoch,
            "position": self.position,
            "num_rows": len(self._rows),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind or state.get("num_rows") != len(self._rows):
            raise SourceError(
                f"source {self.name!r}: checkpoint cursor {dict(state)} does not match "
                f"{self.path} ({self.kind}, {len(self._rows)} rows); the file changed since "
                "the checkpoint: restore it, or start a new run"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)


def build_source(
    cfg: DataSourceConfig, *, seed: int, base_dir: str | Path | None = None
) -> PromptSource:
    """The source a ``DataSourceConfig`` describes; relative file paths resolve against
    ``base_dir`` (default: the working directory)."""
    if cfg.kind == "generator":
        # OmegaConf nodes (DictConfig/ListConfig) must not reach reasoning-gym's dataclass
        # configs: hand it plain python values.
        args = cfg.generator_args
        args = OmegaConf.to_container(args, resolve=True) if isinstance(args, DictConfig) else args
        if not cfg.generator:
            raise SourceError(
                f"source {cfg.name!r}: kind=generator needs 'generator' (e.g. chain_sum)"
            )
        return GeneratorSource(
            cfg.name, cfg.generator, args, seed=seed, num_eval=cfg.num_eval_prompts
        )
    if cfg.kind in ("jsonl", "parquet"):
        if not cfg.path:
            raise SourceError(f"source {cfg.name!r}: kind={cfg.kind} needs 'path'")
        path = Path(cfg.path)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        return FileSource(cfg.name, path, cfg.kind, seed=seed, num_eval=cfg.num_eval_prompts)
    raise SourceError(
        f"source {cfg.name!r}: unknown kind {cfg.kind!r}; accepted: generator, jsonl, parquet"
    )
