"""Fused kernels per shard of a sequence split on the mesh's context axis, with the all-gather scheme:
splash attention (TPU) or cuDNN flash attention (GPU).

Each device gathers every key, value and segment id, puts them back in sequence order, and runs the kernel
for each of its query chunks (two with the zigzag layout, one with the contiguous one) against the keys,
with the chunk's start as the causal mask's offset. Splash masks are static, and cuDNN's keys are cut at the
chunk's end, while which chunks a device holds depends on its index on the axis: so every device's calls
are built and `lax.switch` runs the device's own. Splash skips the key blocks above a chunk's diagonal and
cuDNN never sees them: that is the causal work the zigzag layout balances. The backward pass is the
kernel's own; the all-gather's transpose reduce-scatters the key and value gradients back to their owners.

The ring keeps the jax kernels of `split.py`: it needs each block's log-sum-exp and a backward
pass from the whole row's log-sum-exp, which neither kernel exposes (jax's cuDNN call drops the
log-sum-exp's gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sft_sharded.models.attention.kernels import cudnn_chunk, splash_local
from sft_sharded.models.attention.layout import chunks, layout_order
from sft_sharded.parallel.sharding import current_platform


def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window: int | None, scale: float,
              softcap: float | None, layout: str, q_spec: P, kv_spec: P, shards: int, kernel: str) -> jax.Array:
    """Output [B, T, N, H] in the layout's order, split like the queries (`q_spec[1]` names the axis);
    `kernel` is "splash" or "cudnn"."""
    length, axis = q_BxTxNxH.shape[1], q_spec[1]
    order = layout_order(length, shards, layout)
    natural = None if order is None else np.argsort(order)  # gathered (layout order) -> sequence order
    interpret = current_platform() != "tpu"

    def one_chunk(q, k_all, v_all, seg, seg_all, offset):
        if kernel == "cudnn":
            return cudnn_chunk(q, k_all, v_all, seg, seg_all, offset, window, scale)
        return splash_local(q, k_all, v_all, seg, interpret, window, scale, softcap, kv_segment_ids_BxS=seg_all,
                             offset=offset)

    def branch(device_chunks):
        def run(q, k_all, v_all, seg, seg_all):
            outs = [one_chunk(q[:, row:row + n], k_all, v_all, seg[:, row:row + n], seg_all, start)
                    for row, start, n in device_chunks]
            return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
        return run

    def gather(x):
        x = jax.lax.all_gather(x, axis, axis=1, tiled=True)
        return x if natural is None else jnp.take(x, natural, axis=1)

    def local(q, k, v, seg):
        branches = [branch(device) for device in chunks(length, shards, layout)]
        return jax.lax.switch(jax.lax.axis_index(axis), branches, q, gather(k), gather(v), seg, gather(seg))

    seg_spec = P(q_spec[0], axis)
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
