"""The "xla" implementation: blocked causal attention in plain jax with a flash-style custom VJP, on any
platform (the default on CPU). Query block i only meets keys up to its own end (the upper triangle is never
computed; with a window, keys every query of the block has left behind are skipped too), and the backward
pass recomputes the probabilities from the saved log-sum-exp instead of keeping [T, S] probabilities.
Attention sinks (gpt-oss) join each row's softmax denominator."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sft_sharded.models.attention.masking import MASKED, apply_softcap, attention_mask, scale_of


def block_size(length: int) -> int:
    """Query rows per block of the "xla" implementation: about 8 blocks per sequence (skipping ~44% of
    the causal square), at least 64 rows (fewer, larger ops for short sequences) and at most 512 (the
    float32 scores of one block stay small). Measured on CPU at T=512: 64 beat 128 by 3-5%, 256 lost 8%."""
    return min(512, max(64, -(-length // 8)))


def _block_scores(q_BxCxKxGxH, k_BxExKxH, segment_ids, start: int, first: int, window, scale, softcap):
    """Masked, scaled (and capped) float32 scores of the query block starting at `start` against keys
    [first, end), and the derivative of the capping (None without it)."""
    end = first + k_BxExKxH.shape[1]
    scores = jnp.einsum("btkgd,bskd->bkgts", q_BxCxKxGxH, k_BxExKxH, preferred_element_type=jnp.float32)
    scores, d_cap = apply_softcap(scores * np.float32(scale), softcap)
    q_segments = None if segment_ids is None else segment_ids[:, start:start + q_BxCxKxGxH.shape[1]]
    kv_segments = None if segment_ids is None else segment_ids[:, first:end]
    mask = attention_mask(q_BxCxKxGxH.shape[1], end - first, start - first, q_segments, kv_segments, window)
    return jnp.where(mask, scores, MASKED), d_cap


def _spans(length: int, block: int, window: int | None):
    """(query start, query end, first key): a query block meets keys [first, end) only; with a window,
    keys that every query of the block has left behind are skipped too."""
    spans = []
    for start in range(0, length, block):
        first = 0 if window is None else max(0, start - window + 1)
        spans.append((start, min(start + block, length), first))
    return spans


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def blocked_attention(q_BxTxKxGxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, sinks_KxG, block: int,
                      window: int | None = None, scale: float | None = None, softcap: float | None = None):
    """Causal attention in query blocks of `block` rows (G query heads per kv head), each meeting only the
    keys up to its own end (and inside the window); the backward pass recomputes the probabilities. With
    `sinks_KxG` each row's softmax denominator has exp(sink) too."""
    return _blocked_fwd(q_BxTxKxGxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, sinks_KxG, block, window, scale,
                        softcap)[0]


def _blocked_fwd(q, k, v, segment_ids, sinks, block, window, scale, softcap):
    scale = scale_of(scale, q.shape[-1])
    outs, lses = [], []
    for start, end, first in _spans(q.shape[1], block, window):
        scores_BxKxGxCxE, _ = _block_scores(q[:, start:end], k[:, first:end], segment_ids, start, first, window,
                                            scale, softcap)
        row_max = jnp.max(scores_BxKxGxCxE, axis=-1, keepdims=True)
        if sinks is not None:
            row_max = jnp.maximum(row_max, sinks.astype(jnp.float32)[:, :, None, None])
        unnorm = jnp.exp(scores_BxKxGxCxE - row_max)
        row_sum = jnp.sum(unnorm, axis=-1, keepdims=True)
        if sinks is not None:
            row_sum = row_sum + jnp.exp(sinks.astype(jnp.float32)[:, :, None, None] - row_max)
        outs.append(jnp.einsum("bkgts,bskd->btkgd", (unnorm / row_sum).astype(v.dtype), v[:, first:end]))
        lses.append((row_max + jnp.log(row_sum))[..., 0])
    out_BxTxKxGxH = jnp.concatenate(outs, axis=1)
    return out_BxTxKxGxH, (q, k, v, segment_ids, sinks, out_BxTxKxGxH, jnp.concatenate(lses, axis=-1))


def _blocked_bwd(block, window, scale, softcap, residuals, d_out):
    q, k, v, segment_ids, sinks, out, lse_BxKxGxT = residuals
    scale = scale_of(scale, q.shape[-1])
    # sum_s P·dP = sum_d dO·O per query: the softmax backward without a [T, S] reduction.
    delta_BxKxGxT = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for start, end, first in _spans(q.shape[1], block, window):
        q_i, d_out_i = q[:, start:end], d_out[:, start:end]
        scores, d_cap = _block_scores(q_i, k[:, first:end], segment_ids, start, first, window, scale, softcap)
        probs = jnp.exp(scores - lse_BxKxGxT[..., start:end, None])
        dv = dv.at[:, first:end].add(
            jnp.einsum("bkgts,btkgd->bskd", probs.astype(d_out.dtype), d_out_i, preferred_element_type=jnp.float32)
        )
        d_probs = jnp.einsum("btkgd,bskd->bkgts", d_out_i, v[:, first:end], preferred_element_type=jnp.float32)
        d_scores = probs * (d_probs - delta_BxKxGxT[..., start:end, None])
        d_scores = (d_scores * scale if d_cap is None else d_scores * d_cap * scale).astype(q.dtype)
        dqs.append(jnp.einsum("bkgts,bskd->btkgd", d_scores, k[:, first:end]))
        dk = dk.at[:, first:end].add(jnp.einsum("bkgts,btkgd->bskd", d_scores, q_i, preferred_element_type=jnp.float32))
    d_segments = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
    d_sinks = None
    if sinks is not None:  # the sink's probability times (0 - delta): it has no value to attend to
        p_sink_BxKxGxT = jnp.exp(sinks.astype(jnp.float32)[:, :, None] - lse_BxKxGxT)
        d_sinks = -jnp.einsum("bkgt,bkgt->kg", p_sink_BxKxGxT, delta_BxKxGxT).astype(sinks.dtype)
    return jnp.concatenate(dqs, axis=1), dk.astype(k.dtype), dv.astype(v.dtype), d_segments, d_sinks


blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)
