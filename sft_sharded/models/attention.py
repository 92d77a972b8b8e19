"""Causal grouped-query attention behind one function, `attention(..., implementation=...)`.

Implementations (all honour causality and `segment_ids`; tests compare each against `reference`):

- "reference": plain einsums over the full [T, S] scores. The ground truth, and the decode path (KV cache).
- "xla": blocked attention in plain jax with a flash-style custom VJP. Query block i only meets keys up to
  its own end (the upper triangle is never computed) and the backward pass recomputes probabilities from
  the saved log-sum-exp instead of keeping [T, S] probabilities. Any platform; the default on CPU.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, GPU (bf16/fp16; no soft-capping).
- "splash": the Pallas splash-attention kernel, TPU (interpret mode elsewhere, for tests only).
- "auto": splash on TPU, cudnn on GPU where it supports the dtype, head size and capping, else xla.

Every implementation takes the same options: `window` (a sliding window of keys, the query's own included),
`scale` (of the scores; default head_dim**-0.5) and `softcap` (Gemma 2: scores -> cap * tanh(scores / cap),
after scaling and before the mask). `sinks` (gpt-oss: a learned logit per query head that joins every row's
softmax denominator and attends to nothing) is implemented by "reference" and "xla"; "auto" picks "xla" for
it, the fused kernels and the split-sequence schemes refuse it by name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sft_sharded.choices import DEFAULT_CONTEXT_SCHEME
from sft_sharded.errors import UserError
from sft_sharded.models import attention_kernels
from sft_sharded.models import context as split_sequence
from sft_sharded.models.attention_rules import MASKED, attention_mask, resolve
from sft_sharded.parallel.sharding import sequence_shards



def _block_size(length: int) -> int:
    """Query rows per block of the "xla" implementation: about 8 blocks per sequence (skipping ~44% of
    the causal square), at least 64 rows (fewer, larger ops for short sequences) and at most 512 (the
    float32 scores of one block stay small). Measured on CPU at T=512: 64 beat 128 by 3-5%, 256 lost 8%."""
    return min(512, max(64, -(-length // 8)))


def _scale(scale: float | None, head_dim: int) -> np.float32:
    return np.float32(head_dim ** -0.5 if scale is None else scale)


def _cap(scores, softcap: float | None):
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


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
    scores_BxKxGxTxS = _cap(jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    ) * _scale(scale, head_dim), softcap)
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


def attention(
    q_BxTxNxH: jax.Array,
    k_BxTxKxH: jax.Array,
    v_BxTxKxH: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
    implementation: str = "auto",
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    context: tuple[str, str] = (DEFAULT_CONTEXT_SCHEME, "zigzag"),
    sinks_N: jax.Array | None = None,
) -> jax.Array:
    """Causal self-attention over one sequence per row (training and evaluation; decoding with a KV
    cache calls `dot_product_attention`), optionally over a sliding `window` of keys. Output [B, T, N, H]
    in the inputs' dtype. When the mesh splits the sequence, `models/context.py` attends with the
    (scheme, layout) of `context`, with a fused kernel or its own per shard (`context.per_shard_kernel`)."""
    batch, length, num_heads, head_dim = q_BxTxNxH.shape
    if sinks_N is not None and sequence_shards(length) > 1:
        raise UserError("attention sinks (gpt-oss) are not implemented for a sequence split over the mesh's "
                        "context axis (mesh.context > 1)")
    if sequence_shards(length) > 1:
        return split_sequence.attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window,
                                        float(_scale(scale, head_dim)), softcap, *context, implementation)
    impl = resolve(implementation, q_BxTxNxH.dtype, head_dim, length, softcap, sinks_N is not None)
    if impl == "reference":
        return dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window=window, scale=scale,
                                     softcap=softcap, sinks_N=sinks_N)
    if impl in ("cudnn", "splash"):
        return getattr(attention_kernels, impl)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window,
                                                _scale(scale, head_dim), softcap)
    num_kv = k_BxTxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
    sinks_KxG = None if sinks_N is None else sinks_N.reshape(num_kv, num_heads // num_kv)
    out_BxTxKxGxH = blocked_attention(q_BxTxKxGxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, sinks_KxG,
                                      _block_size(length), window, float(_scale(scale, head_dim)), softcap)
    return out_BxTxKxGxH.reshape(batch, length, num_heads, head_dim)


# --- "xla": blocked causal attention with a recomputing backward pass --------------------------------------
def _block_scores(q_BxCxKxGxH, k_BxExKxH, segment_ids, start: int, first: int, window, scale, softcap):
    """Masked, scaled (and capped) float32 scores of the query block starting at `start` against keys
    [first, end), and the derivative of the capping (None without it)."""
    end = first + k_BxExKxH.shape[1]
    scores = jnp.einsum("btkgd,bskd->bkgts", q_BxCxKxGxH, k_BxExKxH, preferred_element_type=jnp.float32)
    scores = scores * np.float32(scale)
    d_cap = None
    if softcap is not None:
        tanh = jnp.tanh(scores / softcap)
        scores, d_cap = softcap * tanh, 1 - tanh * tanh
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
    scale = _scale(scale, q.shape[-1])
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
    scale = _scale(scale, q.shape[-1])
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
