"""Compact binary encoding of the hop records for the Redis training stream.

msgpack carries the envelope; every numpy array travels as a msgpack extension holding its
dtype, shape and raw little-endian bytes (routed experts stay uint8/uint16 [S, L, k]), never
as lists of numbers. Only the record types registered here can be decoded, so a payload
cannot make the decoder build arbitrary objects.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np

from mopd.types import MicroBatch, Prompt, RolloutSample, ScoredSample

_ARRAY_EXT = 1
_TYPE_KEY = "__t"
_RECORDS: dict[str, type] = {
    cls.__name__: cls for cls in (Prompt, RolloutSample, ScoredSample, MicroBatch)
}
_ALLOWED_DTYPES = {"|u1", "<u2", "<i4", "<i8", "<f2", "<f4", "<f8", "|b1"}


class CodecError(ValueError):
    """A payload that is not a valid encoded record."""


def _little_endian(arr: np.ndarray) -> np.ndarray:
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    return np.ascontiguousarray(arr, dtype=dt)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = _little_endian(obj)
        header = msgpack.packb((arr.dtype.str, list(arr.shape)))
        return msgpack.ExtType(_ARRAY_EXT, header + arr.tobytes())
    if dataclasses.is_dataclass(obj) and type(obj).__name__ in _RECORDS:
        out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        out[_TYPE_KEY] = type(obj).__name__
        return out
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _ARRAY_EXT:
        raise CodecError(f"unknown msgpack extension {code}")
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype, shape = unpacker.unpack()
    if dtype not in _ALLOWED_DTYPES:
        raise CodecError(f"array dtype {dtype!r} is not allowed in a payload")
    offset = unpacker.tell()
    arr = np.frombuffer(data, dtype=np.dtype(dtype), offset=offset)
    expected = int(np.prod(shape)) if shape else 1
    if arr.size != expected:
        raise CodecError(f"array payload has {arr.size} items for shape {shape}")
    # A copy: the payload buffer is read-only, and torch.from_numpy wants writable memory.
    return arr.reshape(shape).copy()


def _object_hook(obj: dict[str, Any]) -> Any:
    name = obj.pop(_TYPE_KEY, None)
    if name is None:
        return obj
    cls = _RECORDS.get(name)
    if cls is None:
        raise CodecError(f"unknown record type {name!r}")
    if cls is MicroBatch:
        for key in ("sample_ids", "domains"):
            obj[key] = tuple(obj.get(key, ()))
    try:
        return cls(**obj)
    except (TypeError, ValueError) as e:
        raise CodecError(f"invalid {name} payload: {e}") from e


def encode(record: Any) -> bytes:
    """Encode a Prompt, RolloutSample, ScoredSample or MicroBatch to bytes."""
    if type(record).__name__ not in _RECORDS:
        raise TypeError(f"only {', '.join(_RECORDS)} can be encoded, got {type(record).__name__}")
    return msgpack.packb(record, default=_default, use_bin_type=True)


def decode(payload: bytes) -> Any:
    """Decode bytes written by ``encode``; raises CodecError on anything else."""
    try:
        out = msgpack.unpackb(payload, ext_hook=_ext_hook, object_hook=_object_hook, raw=False)
    except CodecError:
        raise
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise CodecError(f"not a valid record payload: {e}") from e
    if type(out).__name__ not in _RECORDS:
        raise CodecError(f"payload decodes to {type(out).__name__}, not a record")
    return out
