"""Attention behind one function. `xla` is the reference: plain einsums, causal and segment masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so a row never becomes NaN


def attention_mask(length: int, segment_ids_BxT: jax.Array | None) -> jax.Array:
    """Boolean [B or 1, 1, 1, T, T]: causal, and a query sees only keys of its own segment.

    Causality is by row index, which is right for packing because a segment occupies a contiguous run.
    Padding (segment 0) attends to padding only; every query sees itself, so no row is empty.
    """
    causal_TxT = jnp.tril(jnp.ones((length, length), dtype=bool))
    mask = causal_TxT[None, None, None]
    if segment_ids_BxT is not None:
        same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        mask = mask & same_BxTxT[:, None, None]
    return mask


def dot_product_attention(
    q_BxTxNxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query causal attention; N query heads share K kv heads (N % K == 0). Softmax in float32."""
    batch, length, num_heads, head_dim = q_BxTxNxD.shape
    num_kv = k_BxSxKxD.shape[2]
    group = num_heads // num_kv
    q_BxTxKxGxD = q_BxTxNxD.reshape(batch, length, num_kv, group, head_dim)
    scores_BxKxGxTxS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(head_dim))
    scores_BxKxGxTxS = jnp.where(attention_mask(length, segment_ids_BxT), scores_BxKxGxTxS, _MASKED)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
    out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxSxKxD)
    return out_BxTxKxGxD.reshape(batch, length, num_heads, head_dim)
