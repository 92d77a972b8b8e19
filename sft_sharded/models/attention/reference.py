"""The reference attention: plain einsums over the whole [T, S] scores, softmax in float32. The ground truth
that the tests hold every other implementation to, and the decode path (a KV cache's queries start at
`q_offset`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sft_sharded.models.attention.masking import MASKED, apply_softcap, attention_mask, scale_of


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks_N: jax.Array | None = None,
) -> jax.Array:
    """The reference: grouped-query causal attention; N query heads share K kv heads (N % K == 0). Softmax
    in float32. Without `kv_segment_ids_BxS` keys use the queries' segment ids (self-attention)."""
    batch, length, num_heads, head_dim = q_BxTxNxH.shape
    kv_len, num_kv = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    group = num_heads // num_kv
    q_BxTxKxGxH = q_BxTxNxH.reshape(batch, length, num_kv, group, head_dim)
    scores_BxKxGxTxS, _ = apply_softcap(jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    ) * scale_of(scale, head_dim), softcap)
    kv_segments = segment_ids_BxT if kv_segment_ids_BxS is None else kv_segment_ids_BxS
    mask = attention_mask(length, kv_len, q_offset, segment_ids_BxT, kv_segments, window)
    scores_BxKxGxTxS = jnp.where(mask, scores_BxKxGxTxS, MASKED)
    if sinks_N is None:
        probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    else:  # the sink joins the denominator only
        sinks_KxGx1 = sinks_N.astype(jnp.float32).reshape(num_kv, group, 1)
        lse_BxKxGxT = jnp.logaddexp(jax.nn.logsumexp(scores_BxKxGxTxS, axis=-1), sinks_KxGx1)
        probs_BxKxGxTxS = jnp.exp(scores_BxKxGxTxS - lse_BxKxGxT[..., None]).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(batch, length, num_heads, head_dim)
