"""Attention behind one function. `xla` is the reference: plain einsums, causal and segment masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so a row never becomes NaN


def attention_mask(q_len: int, kv_len: int, q_offset, q_segment_ids, kv_segment_ids) -> jax.Array:
    """Boolean [B or 1, 1, 1, Tq, Tk]: key s is visible to query t when s <= t + q_offset (causal by index,
    which is right for packing because a segment is a contiguous run) and both are in the same segment.
    Padding (segment 0) attends to padding only; every query sees itself, so no row is empty.
    `q_offset` is the queries' start in the key sequence (a KV cache's fill level when decoding)."""
    q_idx = jnp.arange(q_len)[:, None] + q_offset
    mask = (jnp.arange(kv_len)[None, :] <= q_idx)[None, None, None]
    if q_segment_ids is not None:
        same_BxTxS = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & same_BxTxS[:, None, None]
    return mask


def dot_product_attention(
    q_BxTxNxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """Grouped-query causal attention; N query heads share K kv heads (N % K == 0). Softmax in float32.
    Without `kv_segment_ids_BxS` keys use the queries' segment ids (self-attention over the same tokens)."""
    batch, length, num_heads, head_dim = q_BxTxNxD.shape
    kv_len, num_kv = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    group = num_heads // num_kv
    q_BxTxKxGxD = q_BxTxNxD.reshape(batch, length, num_kv, group, head_dim)
    scores_BxKxGxTxS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(head_dim))
    kv_segments = segment_ids_BxT if kv_segment_ids_BxS is None else kv_segment_ids_BxS
    mask = attention_mask(length, kv_len, q_offset, segment_ids_BxT, kv_segments)
    scores_BxKxGxTxS = jnp.where(mask, scores_BxKxGxTxS, _MASKED)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
    out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxSxKxD)
    return out_BxTxKxGxD.reshape(batch, length, num_heads, head_dim)
