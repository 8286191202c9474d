"""A teacher must tokenise exactly as the student does.

MOPD scores the student's own token ids with the teacher; if the two tokenizers differ, the
teacher scores other strings than the student wrote and the rewards are garbage without any
error. ``check_tokenizer_compatible`` compares the vocabulary (added tokens included) and the
special tokens of both at start-up and raises naming the teacher and the differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["TokenizerMismatchError", "check_tokenizer_compatible", "tokenizer_fingerprint"]

_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


class TokenizerMismatchError(ValueError):
    """A teacher's tokenizer differs from the student's."""


def tokenizer_fingerprint(path: str | Path) -> dict[str, Any]:
    """What must agree between student and teacher: vocabulary and special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return {
        "vocab": dict(tok.get_vocab()),
        "special": {name: getattr(tok, name, None) for name in _SPECIAL},
        "all_special": dict(zip(tok.all_special_tokens, tok.all_special_ids, strict=True)),
    }


def _differences(student: dict[str, Any], teacher: dict[str, Any], limit: int = 5) -> list[str]:
    out: list[str] = []
    sv, tv = student["vocab"], teacher["vocab"]
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))
        only_t = sorted(set(tv) - set(sv))
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])
        out.append(
            f"vocabulary: {len(sv)} vs {len(tv)} entries; only in the student's: "
            f"{only_s[:limit]}, only in the teacher's: {only_t[:limit]}, different ids: "
            f"{[(k, sv[k], tv[k]) for k in moved[:limit]]}"
        )
    for name in _SPECIAL:
        if student["special"][name] != teacher["special"][name]:
            out.append(f"{name}: {student['special'][name]} vs {teacher['special'][name]}")
    if student["all_special"] != teacher["all_special"]:
        out.append(
            f"special tokens: {sorted(student['all_special'].items())[:limit]} vs "
            f"{sorted(teacher['all_special'].items())[:limit]}"
        )
    return out


def check_tokenizer_compatible(
    student_path: str | Path, teacher_path: str | Path, teacher_name: str
) -> None:
    """Raise ``TokenizerMismatchError`` unless the teacher tokenises exactly as the student.

    Args:
        student_path / teacher_path: checkpoint (or tokenizer) folders in HF layout.
        teacher_name: named in the error.
    """
    diffs = _differences(tokenizer_fingerprint(student_path), tokenizer_fingerprint(teacher_path))
    if diffs:
        raise TokenizerMismatchError(
            f"teacher {teacher_name!r} ({teacher_path}) does not share the student's tokenizer "
            f"({student_path}): " + "; ".join(diffs) + ". MOPD scores the student's token ids "
            "with the teacher, so both must use the same tokenizer: pick a teacher trained "
            "from the student's tokenizer."
        )
