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

The package bottom up (imports run one way): `masking` (the masked value, scale, soft-cap and which keys a
query sees), `layout` (the order of a split sequence's positions), `choose` (which kernel a name stands
for, whole or per shard), `reference`, `flash` (the one flash-style forward/backward of the jax kernels),
`blockwise` ("xla": its query blocks folded over spans known at trace time), `kernels` (splash, cuDNN),
`split_fused` (those kernels per shard of a split sequence), `split` (the ring and all-gather schemes: the same
folds over key blocks that arrive from other devices), and `attention` here.
"""

from __future__ import annotations

import jax

from sft_sharded.choices import DEFAULT_CONTEXT_SCHEME
from sft_sharded.errors import UserError
from sft_sharded.models.attention import kernels, split
from sft_sharded.models.attention.blockwise import block_size, blocked_attention
from sft_sharded.models.attention.choose import choose_kernel
from sft_sharded.models.attention.masking import scale_of
from sft_sharded.models.attention.reference import dot_product_attention
from sft_sharded.parallel.sharding import sequence_shards

__all__ = ["attention", "blocked_attention", "choose_kernel", "dot_product_attention"]


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
    in the inputs' dtype. When the mesh splits the sequence, `split.py` attends with the
    (scheme, layout) of `context`, with a fused kernel or its own per shard (`choose_kernel` with a `Split`)."""
    batch, length, num_heads, head_dim = q_BxTxNxH.shape
    if sinks_N is not None and sequence_shards(length) > 1:
        raise UserError("attention sinks (gpt-oss) are not implemented for a sequence split over the mesh's "
                        "context axis (mesh.context > 1)")
    if sequence_shards(length) > 1:
        return split.attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window,
                               float(scale_of(scale, head_dim)), softcap, *context, implementation)
    impl = choose_kernel(implementation, q_BxTxNxH.dtype, head_dim, length, softcap, sinks_N is not None)
    if impl == "reference":
        return dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window=window, scale=scale,
                                     softcap=softcap, sinks_N=sinks_N)
    if impl in ("cudnn", "splash"):
        return getattr(kernels, impl)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window,
                                      scale_of(scale, head_dim), softcap)
    num_kv = k_BxTxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
    sinks_KxG = None if sinks_N is None else sinks_N.reshape(num_kv, num_heads // num_kv)
    out_BxTxKxGxH = blocked_attention(q_BxTxKxGxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, sinks_KxG,
                                      block_size(length), window, float(scale_of(scale, head_dim)), softcap)
    return out_BxTxKxGxH.reshape(batch, length, num_heads, head_dim)
