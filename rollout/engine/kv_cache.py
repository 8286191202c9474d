"""The KV cache of the embedded engine: one row (a "slot") per running sequence.

``SlotKVCache`` is a ``transformers.Cache`` whose layers keep one row per running sequence in
preallocated buffers: ``[S, H_kv, capacity, D]`` for full-attention layers, a ring
``[S, H_kv, W, D]`` (position p at slot ``p % W``) for sliding-window layers of window W.
Running sequences occupy rows ``0..B-1`` (a retired row is filled by moving the last one in),
so a decode step writes one position per row and reads a plain slice with no copy. Prefill
rows start empty, so attention reads the forward's own keys, and only the last W keys of each
row go into a ring. An extend forward (a session turn restored from a snapshot) starts its
rows at their cached length. Where a forward writes and what attention reads back is the
engine's ``StepPlan``, set on the cache before each forward; ``rollout.engine.attention``
builds the masks that go with it.

Shape legend:
    B   sequences in a forward (rows of the batch)
    Q   query positions per row in a forward
    S   KV slots (max running sequences); R rows moved at once
    K   key positions kept for a row (ring slots for sliding layers)
    N   picked keys (written at scattered rows and positions)
    H   query heads; H_kv key/value heads; D head dim
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["SlotKVCache", "StepPlan"]


@dataclasses.dataclass
class StepPlan:
    """Where one forward writes its keys/values and what attention reads back.

    Prefill (``prefill=True``): rows ``row0..row0+B-1`` start empty and run positions
    ``0..Q-1``, so attention reads this forward's own keys; full-attention layers store all
    of them, sliding layers only the last ``window`` of each row (``keep_*``). Decode: rows
    ``0..B-1`` run one position each (``pos_B``); full-attention layers read ``kv_len`` key
    positions, sliding layers ``ring_len`` ring slots.
    """

    prefill: bool
    row0: int = 0
    rows_B: torch.Tensor | None = None  # decode: 0..B-1
    pos_B: torch.Tensor | None = None  # decode: the position each row writes
    ring_B: torch.Tensor | None = None  # decode: the ring slot each row writes (pos % window)
    kv_len: int = 0
    ring_len: int = 0
    keep_rows_N: torch.Tensor | None = None  # prefill: slot row of each key a ring keeps
    keep_b_N: torch.Tensor | None = None  # prefill: its batch row in this forward
    keep_q_N: torch.Tensor | None = None  # prefill: its position
    keep_slot_N: torch.Tensor | None = None  # prefill: its ring slot
    # Extend (``extend=True``, a prefill whose rows already hold a cached prefix, restored
    # from a session): row b runs positions ``start_b..start_b+Q-1``. Full-attention layers
    # write the real new keys (``ext_*``) at their positions and read ``kv_len`` positions;
    # sliding layers read the ring as it was plus this forward's keys (``W + Q`` keys), then
    # keep the last ``window`` new keys of each row (``keep_*``).
    extend: bool = False
    ext_rows_N: torch.Tensor | None = None  # slot row of each new key
    ext_b_N: torch.Tensor | None = None  # its batch row in this forward
    ext_q_N: torch.Tensor | None = None  # its query index in this forward
    ext_pos_N: torch.Tensor | None = None  # its position


class _SlotLayer(CacheLayerMixin):
    """One decoder layer's keys/values, lazily allocated.

    Full attention: ``[S, H_kv, capacity, D]``, key position p at index p. Sliding window
    ``W``: a ring ``[S, H_kv, W, D]``, key position p at slot ``p % W``; a decode query at
    position i needs keys ``i-W+1..i``, exactly what the ring holds once i is written.
    """

    is_sliding = False

    def __init__(self, owner: SlotKVCache, window: int | None = None) -> None:
        super().__init__()
        self.owner = owner
        self.window = window
        self.is_sliding = window is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots = self.owner.num_slots
        length = self.window if self.window is not None else self.owner.capacity
        self.device = key_states.device
        self.keys = key_states.new_zeros((slots, key_states.shape[1], length, key_states.shape[3]))
        self.values = value_states.new_zeros(
            (slots, value_states.shape[1], length, value_states.shape[3])
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.owner.plan
        keys_BHQD = key_states.to(self.keys.dtype)
        values_BHQD = value_states.to(self.values.dtype)
        if plan.extend:
            rows = slice(plan.row0, plan.row0 + key_states.shape[0])
            if self.window is None:
                where = (plan.ext_rows_N, slice(None), plan.ext_pos_N)
                self.keys[where] = keys_BHQD[plan.ext_b_N, :, plan.ext_q_N]
                self.values[where] = values_BHQD[plan.ext_b_N, :, plan.ext_q_N]
                return self.keys[rows, :, : plan.kv_len], self.values[rows, :, : plan.kv_len]
            # The ring's old keys are read before the new ones overwrite any slot.
            keys = torch.cat([self.keys[rows], keys_BHQD], dim=2)
            values = torch.cat([self.values[rows], values_BHQD], dim=2)
            self.keys[plan.keep_rows_N, :, plan.keep_slot_N] = keys_BHQD[
                plan.keep_b_N, :, plan.keep_q_N
            ]
            self.values[plan.keep_rows_N, :, plan.keep_slot_N] = values_BHQD[
                plan.keep_b_N, :, plan.keep_q_N
            ]
            return keys, values
        if plan.prefill:
            batch, _, q_len, _ = key_states.shape
            if self.window is None:
                rows = slice(plan.row0, plan.row0 + batch)
                self.keys[rows, :, :q_len] = keys_BHQD
                self.values[rows, :, :q_len] = values_BHQD
            else:
                rows_N, slot_N = plan.keep_rows_N, plan.keep_slot_N
                self.keys[rows_N, :, slot_N] = keys_BHQD[plan.keep_b_N, :, plan.keep_q_N]
                self.values[rows_N, :, slot_N] = values_BHQD[plan.keep_b_N, :, plan.keep_q_N]
            return key_states, value_states
        batch = key_states.shape[0]
        where_B = plan.pos_B if self.window is None else plan.ring_B
        self.keys[plan.rows_B, :, where_B] = keys_BHQD[:, :, 0]
        self.values[plan.rows_B, :, where_B] = values_BHQD[:, :, 0]
        length = plan.kv_len if self.window is None else plan.ring_len
        return self.keys[:batch, :, :length], self.values[:batch, :, :length]

    def grow(self, capacity: int) -> None:
        if not self.is_initialized or self.window is not None:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def move_rows(self, src_R: torch.Tensor, dst_R: torch.Tensor, length: int) -> None:
        if self.is_initialized:
            used = slice(None) if self.window is not None else slice(0, length)
            self.keys[dst_R, :, used] = self.keys[src_R, :, used]
            self.values[dst_R, :, used] = self.values[src_R, :, used]

    def snapshot(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of row ``row``'s keys/values: positions ``0..length-1`` (full attention)
        or the whole ring (sliding window)."""
        used = slice(None) if self.window is not None else slice(0, length)
        return self.keys[row, :, used].clone(), self.values[row, :, used].clone()

    def restore(self, row: int, keys_HKD: torch.Tensor, values_HKD: torch.Tensor) -> None:
        self.keys[row, :, : keys_HKD.shape[1]] = keys_HKD
        self.values[row, :, : values_HKD.shape[1]] = values_HKD

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        plan = self.owner.plan
        if plan.extend:
            return (plan.kv_len if self.window is None else self.window + query_length), 0
        if plan.prefill:
            return query_length, 0
        return (plan.kv_len if self.window is None else plan.ring_len), 0

    def get_seq_length(self) -> int:
        return 0  # positions are per row; the engine always passes position_ids

    def get_max_length(self) -> int:
        return self.window if self.window is not None else self.owner.capacity


class SlotKVCache(Cache):
    """A ``transformers.Cache`` holding one KV row per running sequence (see module doc).

    ``windows[i]`` is layer i's sliding window (``None``: full attention).
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        capacity: int = 256,
        windows: Sequence[int | None] | None = None,
    ) -> None:
        self.num_slots = num_slots
        self.capacity = capacity
        self.plan: StepPlan | None = None
        windows = list(windows) if windows is not None else [None] * num_layers
        super().__init__(layers=[_SlotLayer(self, w) for w in windows])

    def ensure_capacity(self, needed: int, limit: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = min(max(needed, 2 * self.capacity), max(limit, needed))
        for layer in self.layers:
            layer.grow(new_cap)
        self.capacity = new_cap

    def move_rows(self, src_R: torch.Tensor, dst_R: torch.Tensor, length: int) -> None:
        """Copy key positions ``0..length-1`` of rows ``src_R`` onto rows ``dst_R`` (disjoint)
        in every layer."""
        for layer in self.layers:
            layer.move_rows(src_R, dst_R, length)

    @property
    def allocated(self) -> bool:
        return all(layer.is_initialized for layer in self.layers)

    def snapshot_row(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's keys/values of row ``row`` holding positions ``0..length-1``."""
        return [layer.snapshot(row, length) for layer in self.layers]

    def restore_row(self, row: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write a ``snapshot_row`` back into row ``row`` (of any slot)."""
        for layer, (keys_HKD, values_HKD) in zip(self.layers, layers, strict=True):
            layer.restore(row, keys_HKD, values_HKD)

    def drop_buffers(self) -> None:
        """Free every buffer (re-allocated lazily on the next forward)."""
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
