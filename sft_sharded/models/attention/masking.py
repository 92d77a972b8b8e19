"""What every attention implementation agrees on, below all of them: the masked score, the scores' scale,
the soft-cap and its derivative, and which keys a query sees. The implementations of this package import
these facts from here; imports run one way, from this module up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so a row never becomes NaN


def scale_of(scale: float | None, head_dim: int) -> np.float32:
    """The scores' scale: the one asked for, else head_dim ** -0.5."""
    return np.float32(head_dim ** -0.5 if scale is None else scale)


def apply_softcap(scores: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array | None]:
    """Gemma 2's soft-cap, cap * tanh(scores / cap), and its derivative for a backward pass (None, and
    the scores unchanged, without a cap)."""
    if cap is None:
        return scores, None
    tanh = jnp.tanh(scores / cap)
    return cap * tanh, 1 - tanh * tanh


def visible(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """The visibility rule, broadcast over the positions given: key position s is visible to query position t
    when s <= t (causal) and, with a sliding `window` (Mistral's `sliding_window`), s > t - window (the last
    `window` keys, the query's own included)."""
    ok = k_pos <= q_pos
    return ok if window is None else ok & (k_pos > q_pos - window)


def positions_mask(q_pos_T, k_pos_S, q_segment_ids, kv_segment_ids, window: int | None = None) -> jax.Array:
    """Boolean [B or 1, 1, 1, Tq, Tk] for queries and keys at the given positions: `visible`, and both in
    the same segment (right for packing because a segment is a contiguous run of positions). Padding
    (segment 0) attends to padding only; every query sees itself, so no row is empty."""
    mask = visible(q_pos_T[:, None], k_pos_S[None, :], window)[None, None, None]
    if q_segment_ids is not None:
        same_BxTxS = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & same_BxTxS[:, None, None]
    return mask


def attention_mask(q_len: int, kv_len: int, q_offset, q_segment_ids, kv_segment_ids,
                   window: int | None = None) -> jax.Array:
    """`positions_mask` of consecutive queries and keys: `q_offset` is the queries' start in the key
    sequence (a KV cache's fill level when decoding)."""
    return positions_mask(jnp.arange(q_len) + q_offset, jnp.arange(kv_len), q_segment_ids, kv_segment_ids, window)
