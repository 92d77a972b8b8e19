"""The "xla" implementation: blocked causal attention in plain jax with a flash-style custom VJP, on any
platform (the default on CPU). Query block i only meets keys up to its own end (the upper triangle is never
computed; with a window, keys every query of the block has left behind are skipped too): its key span is
known at trace time, so each query block is one fold of `flash` over one span, with no test at run time.
Attention sinks (gpt-oss) join each row's softmax denominator."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sft_sharded.models.attention import flash
from sft_sharded.models.attention.masking import attention_mask, scale_of


def block_size(length: int) -> int:
    """Query rows per block of the "xla" implementation: about 8 blocks per sequence (skipping ~44% of
    the causal square), at least 64 rows (fewer, larger ops for short sequences) and at most 512 (the
    float32 scores of one block stay small). Measured on CPU at T=512: 64 beat 128 by 3-5%, 256 lost 8%."""
    return min(512, max(64, -(-length // 8)))


def _mask(segment_ids, start: int, end: int, first: int, window):
    """Which keys [first, end) each query [start, end) sees."""
    q_segments = None if segment_ids is None else segment_ids[:, start:end]
    kv_segments = None if segment_ids is None else segment_ids[:, first:end]
    return attention_mask(end - start, end - first, start - first, q_segments, kv_segments, window)


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
    opts = flash.Options(window, float(scale_of(scale, q.shape[-1])), softcap)
    q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH = (flash.heads_major(x) for x in (q, k, v))
    outs, lses = [], []
    for start, end, first in _spans(q.shape[1], block, window):
        mask = _mask(segment_ids, start, end, first, window)
        q_i, k_i, v_i = q_BxKxGxTxH[:, :, :, start:end], k_BxKxTxH[:, :, first:end], v_BxKxTxH[:, :, first:end]
        out, lse = flash.finish(flash.fold(flash.start(q_i), q_i, k_i, v_i, mask, opts), v.dtype, sinks)
        outs.append(out)
        lses.append(lse)
    out_BxTxKxGxH = flash.tokens_major(jnp.concatenate(outs, axis=3))
    residuals = (q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids, sinks, out_BxTxKxGxH, jnp.concatenate(lses, -1))
    return out_BxTxKxGxH, residuals


def _blocked_bwd(block, window, scale, softcap, residuals, d_out):
    q, k, v, segment_ids, sinks, out, lse_BxKxGxT = residuals  # q, k, v heads-major
    opts = flash.Options(window, float(scale_of(scale, q.shape[-1])), softcap)
    delta_BxKxGxT = flash.delta(out, d_out)
    d_out = flash.heads_major(d_out)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for start, end, first in _spans(q.shape[3], block, window):
        mask = _mask(segment_ids, start, end, first, window)
        rows, keys = slice(start, end), slice(first, end)
        dq_i, dk_i, dv_i = flash.grads(q[:, :, :, rows], k[:, :, keys], v[:, :, keys], mask, d_out[:, :, :, rows],
                                       lse_BxKxGxT[..., rows], delta_BxKxGxT[..., rows], opts)
        dqs.append(dq_i.astype(q.dtype))
        dk = dk.at[:, :, keys].add(dk_i)
        dv = dv.at[:, :, keys].add(dv_i)
    d_segments = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
    d_sinks = None if sinks is None else flash.sink_grad(sinks, lse_BxKxGxT, delta_BxKxGxT)
    dq = flash.tokens_major(jnp.concatenate(dqs, axis=3))
    return dq, flash.tokens_major(dk).astype(k.dtype), flash.tokens_major(dv).astype(v.dtype), d_segments, d_sinks


blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)
