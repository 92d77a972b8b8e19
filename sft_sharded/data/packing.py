"""Pack examples into fixed-length rows (best-fit decreasing) with segment ids and positions, or pad them.

Each example is shifted on its own (inputs `tokens[:-1]`, targets `tokens[1:]`) before it is placed, so
no target ever crosses a segment boundary: the token that opens a segment is never predicted from the
previous segment, and padding (segment 0) is never a target.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from sft_sharded.batch import BATCH_KEYS
from sft_sharded.data.formats import Example

ROW_KEYS = BATCH_KEYS  # a packed row holds every key of the batch format


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest first, each into the fullest bin it still fits."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an example of {n} positions does not fit in rows of {capacity}")
        slot = bisect.bisect_left(free, (n, -1))
        if slot < len(free):
            remaining, b = free.pop(slot)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, b))
    return bins


def _empty_row(length: int) -> dict[str, np.ndarray]:
    row = {key: np.zeros(length, np.int32) for key in ROW_KEYS}
    row["loss_mask"] = np.zeros(length, np.float32)  # target weights (per-message weights; else 0/1)
    return row


def _place(row: dict[str, np.ndarray], start: int, example: Example, segment: int) -> int:
    n = len(example.tokens) - 1
    end = start + n
    row["input_ids"][start:end] = example.tokens[:-1]
    row["labels"][start:end] = example.tokens[1:]
    row["loss_mask"][start:end] = example.target_weights()[1:]
    row["segment_ids"][start:end] = segment
    row["positions"][start:end] = np.arange(n)
    return end


def pack(examples: Sequence[Example], max_length: int) -> list[dict[str, np.ndarray]]:
    """Rows of `max_length` positions holding whole examples; examples keep their order inside a row."""
    bins = best_fit_decreasing([len(e.tokens) - 1 for e in examples], max_length)
    rows = []
    for members in bins:
        row, pos = _empty_row(max_length), 0
        for segment, i in enumerate(sorted(members), start=1):
            pos = _place(row, pos, examples[i], segment)
        rows.append(row)
    return rows


def pad(example: Example, length: int) -> dict[str, np.ndarray]:
    """One example alone in a row of `length` positions (unpacked mode)."""
    row = _empty_row(length)
    _place(row, 0, example, 1)
    return row


def unpack(row: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, mask) of each segment of a row, in order: the inverse of `pack` for tests and tools."""
    out = []
    for segment in range(1, int(row["segment_ids"].max(initial=0)) + 1):
        where = np.flatnonzero(row["segment_ids"] == segment)
        tokens = np.concatenate([row["input_ids"][where[:1]], row["labels"][where]])
        mask = np.concatenate([[False], row["loss_mask"][where] != 0])
        out.append((tokens, mask))
    return out


def efficiency(rows: Sequence[dict[str, np.ndarray]]) -> float:
    """Real (non-padding) positions over all positions."""
    total = sum(r["segment_ids"].size for r in rows)
    return sum(int((r["segment_ids"] > 0).sum()) for r in rows) / max(total, 1)
