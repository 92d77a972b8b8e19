"""The batch format (keys, shapes, dtypes) and its host-side checks. numpy only: the data pipeline and
the trainer both import it.

| key | dtype, shape | meaning |
|---|---|---|
| `input_ids` | int [B, T] | tokens fed to the model |
| `labels` | int [B, T] | `labels[:, t]` is the target at position t (already shifted); -100 never counts |
| `loss_mask` | bool or float [B, T], optional | 1 = train on this target (authoritative, except for -100) |
| `segment_ids` | int [B, T], optional | 0 = padding, 1..k = packed sequence; attention stays inside a segment |
| `positions` | int [B, T], optional | position inside its segment (RoPE); default `arange(T)` |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sft_sharded.errors import UserError

BATCH_KEYS = ("input_ids", "labels", "loss_mask", "segment_ids", "positions")
IGNORE_INDEX = -100  # a label that is never a target (the Hugging Face convention)


def signature(batch: Mapping[str, Any]) -> tuple:
    """Keys, shapes and dtypes: what the layout checks (and the compiled step) depend on."""
    return tuple(sorted((k, tuple(np.shape(v)), str(getattr(v, "dtype", None))) for k, v in batch.items()))


def check_layout(batch: Any, data_parallel: int, grad_accum_steps: int, context: int = 1) -> None:
    """Keys, shapes, dtypes, rows that split over the data-parallel devices and the micro-batches, and
    positions that split over the `context` devices of a row."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of arrays with keys {BATCH_KEYS}, got {type(batch).__name__}")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise KeyError(f"batch is missing {key!r}; it has keys {sorted(batch)}")
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        raise KeyError(f"batch has unknown keys {unknown}; allowed keys are {list(BATCH_KEYS)}")
    shape = tuple(np.shape(batch["input_ids"]))
    if len(shape) != 2:
        raise ValueError(f"batch['input_ids'] must be [batch, length], got shape {shape}")
    for key, value in batch.items():
        dtype = np.dtype(value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype)
        if tuple(np.shape(value)) != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(np.shape(value))}, expected {shape} like input_ids")
        if key != "loss_mask" and not np.issubdtype(dtype, np.integer):
            raise TypeError(f"batch[{key!r}] must hold integer ids, got dtype {dtype}")
    if shape[0] % data_parallel:
        raise UserError(f"batch size {shape[0]} (batch['input_ids'].shape={shape}) is not divisible by the "
                        f"data-parallel size data x fsdp x expert = {data_parallel}")
    if shape[1] % context:
        raise UserError(f"sequence length {shape[1]} (batch['input_ids'].shape={shape}) is not divisible by the "
                        f"context-parallel size mesh.context = {context}")
    if shape[0] % grad_accum_steps:
        raise UserError(f"batch size {shape[0]} is not divisible by grad_accum_steps={grad_accum_steps}")


def _host_parts(x: Any) -> list[np.ndarray]:
    """This process's data of a host or device array (a jax array's addressable shards)."""
    if hasattr(x, "addressable_shards"):
        return [np.asarray(shard.data) for shard in x.addressable_shards]
    return [np.asarray(x)]


def check_ids(batch: Mapping[str, Any], vocab_size: int | None) -> None:
    """Token ids in [0, vocab) and labels in [0, vocab) or -100, on every batch: inside the step an
    out-of-range id is silently wrapped or clamped by the gathers. Reads this process's shards only."""
    for key, allowed in (("input_ids", ()), ("labels", (IGNORE_INDEX,))):
        bad = []
        for part in _host_parts(batch[key]):
            out = part[(part < 0) | (part >= vocab_size)] if vocab_size else part[part < 0]
            bad.append(out[~np.isin(out, allowed)])
        bad = np.concatenate(bad)
        if bad.size:
            limit = f"[0, {vocab_size})" if vocab_size else ">= 0"
            also = " or -100 (ignored)" if allowed else ""
            raise UserError(f"batch[{key!r}] holds {int(bad[0])} ({bad.size} such value(s)); ids must be in "
                            f"{limit}{also} for a model with vocab_size={vocab_size}")
