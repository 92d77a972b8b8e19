"""Fused attention kernels: cuDNN flash attention (GPU) and Pallas splash attention (TPU).

Both take [B, T, N, H] queries and [B, T, K, H] keys/values (N % K == 0), are causal and keep tokens
of different `segment_ids` apart. `choose.choose_kernel` chooses between them and the jax paths;
`split_fused.py` runs them on the query chunks of a split sequence (`cudnn_chunk`, `splash_local`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sft_sharded.errors import UserError
from sft_sharded.models.attention.masking import attention_mask, scale_of
from sft_sharded.parallel.sharding import activation_spec, current_platform

Q_AXES = ("batch", "length", "act_heads", "head_dim")
KV_AXES = ("batch", "length", "act_kv_heads", "head_dim")


def cudnn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT=None, window: int | None = None, scale=None,
          softcap=None) -> jax.Array:
    """cuDNN flash attention with its causal mask (and sliding window). Packed rows add a [B, 1, T, T]
    same-segment mask (cuDNN folds it into a bias: B·T² elements, not B·N·T² scores); rows without packing
    need none. cuDNN has no soft-capping: `choose_kernel` never picks it then."""
    assert softcap is None, "cuDNN attention has no soft-capping"
    mask = None
    if segment_ids_BxT is not None:
        mask = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask, is_causal=True, implementation="cudnn", scale=scale,
        local_window_size=None if window is None else (window - 1, 0),  # left keys besides the query's own
    )


def cudnn_chunk(q_BxCxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxC, kv_segment_ids_BxS, offset: int,
                window: int | None, scale: float) -> jax.Array:
    """cuDNN attention of the queries at positions offset .. offset+C-1 of a row against its keys 0 .. S-1
    (a chunk of a split sequence against the gathered keys). jax's cuDNN call has no causal mask with an
    offset, so the keys that the causal mask (and the window) hide from the whole chunk are sliced off
    first, which leaves the chunk's own share of the causal work, and a [B, 1, C, S'] mask (causal from
    the offset, window, same segment) covers the rest. The start of the slice is even: cuDNN with a mask
    needs even lengths to train. Off GPU the same call runs jax's XLA implementation (the CPU tests)."""
    length = q_BxCxNxH.shape[1]
    end = offset + length
    first = 0 if window is None else max(0, (offset - window + 1) // 2 * 2)
    mask = attention_mask(length, end - first, offset - first, segment_ids_BxC, kv_segment_ids_BxS[:, first:end],
                          window)[:, 0]
    return jax.nn.dot_product_attention(
        q_BxCxNxH, k_BxSxKxH[:, first:end], v_BxSxKxH[:, first:end], mask=mask, scale=scale,
        implementation="cudnn" if current_platform() == "gpu" else "xla",
    )


def _block(length: int) -> int:
    """Splash's block of rows: the largest of 512, 256, 128 that divides the length."""
    for size in (512, 256, 128):
        if length % size == 0:
            return size
    raise UserError("model.attention='splash' needs sequence lengths divisible by 128 (data.max_length, "
                    f"data.pad_to_multiple_of), got {length}")


def splash_local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, interpret: bool, window: int | None,
                  scale: float, softcap: float | None, kv_segment_ids_BxS=None, offset: int = 0):
    """Splash attention on one device's block: an MQA kernel per kv head (its G query heads share it).
    Queries are positions offset + 0..T-1 of the keys' 0..S-1 (offset 0, S = T: the whole sequence; a
    chunk of a split sequence against all its keys otherwise); `kv_segment_ids_BxS` defaults to the
    queries' own."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernels,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    batch, length, num_heads, head_dim = q_BxTxNxH.shape
    num_kv, kv_length = k_BxSxKxH.shape[2], k_BxSxKxH.shape[1]
    group = num_heads // num_kv
    bq, bkv = _block(length), _block(kv_length)
    blocks = kernels.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv,
    )
    if window is None:
        one = masks.CausalMask((length, kv_length), offset=offset)
    else:  # (left, right) = (window - 1, 0): causal, and at most window - 1 keys before the query's own
        one = masks.LocalMask((length, kv_length), window_size=(window - 1, 0), offset=offset)
    mask = masks.MultiHeadMask([one for _ in range(group)])
    kernel = kernels.make_splash_mqa(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret,
                                     attn_logits_soft_cap=softcap)
    # The kernel does not scale the scores; scale q in float32 before it goes back to the input dtype.
    q_BxKxGxTxH = (q_BxTxNxH.astype(jnp.float32) * scale).astype(q_BxTxNxH.dtype)
    q_BxKxGxTxH = q_BxKxGxTxH.reshape(batch, length, num_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
    k_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3)
    v_BxKxSxH = v_BxSxKxH.transpose(0, 2, 1, 3)
    if segment_ids_BxT is not None and kv_segment_ids_BxS is None:
        kv_segment_ids_BxS = segment_ids_BxT

    def one_head(q_GxTxH, k_SxH, v_SxH, segments_T, kv_segments_S):
        ids = None if segments_T is None else kernels.SegmentIds(q=segments_T, kv=kv_segments_S)
        return kernel(q_GxTxH, k_SxH, v_SxH, segment_ids=ids)

    per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None, None))  # over kv heads
    segments_axis = 0 if segment_ids_BxT is not None else None
    out_BxKxGxTxH = jax.vmap(per_row, in_axes=(0, 0, 0, segments_axis, segments_axis))(
        q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT, kv_segment_ids_BxS
    )
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)


def splash(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT=None, window: int | None = None, scale=None,
           softcap=None) -> jax.Array:
    """Splash attention, per device under the mesh (a Pallas call is not partitioned by XLA): batch split
    like the activations, heads split on the tensor axis when both q and kv heads divide it."""
    scale = scale_of(scale, q_BxTxNxH.shape[-1])
    local = functools.partial(splash_local, interpret=current_platform() != "tpu", window=window, scale=scale,
                              softcap=softcap)
    q_spec = activation_spec(q_BxTxNxH.shape, Q_AXES)
    if q_spec is None:  # no mesh: one device
        return local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    kv_spec = activation_spec(k_BxTxKxH.shape, KV_AXES)
    if q_spec[2] != kv_spec[2]:  # heads must split alike, or a device's q heads lose their kv heads
        q_spec = P(q_spec[0], None, None, None)
        kv_spec = P(kv_spec[0], None, None, None)
    segments_spec = None if segment_ids_BxT is None else P(q_spec[0], None)  # None: no leaves to split
    fn = jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, segments_spec), out_specs=q_spec, check_vma=False)
    return fn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
