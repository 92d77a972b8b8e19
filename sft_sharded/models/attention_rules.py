"""What every attention implementation agrees on, below all of them: the masked score, which keys a
query sees (`attention_mask`), the order of positions when the mesh splits a sequence (`layout_order`),
and which implementation a name stands for on this platform (`resolve`).

The implementations (`attention.py`'s reference and blocked XLA path, `attention_kernels.py`, the
split-sequence schemes of `context.py` and `context_fused.py`) import these facts from here, and
`attention.attention` dispatches to them: imports run one way, from this module up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sft_sharded.choices import ATTENTION_IMPLEMENTATIONS
from sft_sharded.errors import UserError
from sft_sharded.parallel.sharding import current_platform

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so a row never becomes NaN


def attention_mask(q_len: int, kv_len: int, q_offset, q_segment_ids, kv_segment_ids,
                   window: int | None = None) -> jax.Array:
    """Boolean [B or 1, 1, 1, Tq, Tk]: key s is visible to query t when s <= t + q_offset (causal by index,
    which is right for packing because a segment is a contiguous run) and both are in the same segment.
    Padding (segment 0) attends to padding only; every query sees itself, so no row is empty.
    `q_offset` is the queries' start in the key sequence (a KV cache's fill level when decoding).
    `window` (sliding-window attention, as Mistral's `sliding_window`): only the last `window` keys,
    the query's own included, are visible."""
    q_idx = jnp.arange(q_len)[:, None] + q_offset
    k_idx = jnp.arange(kv_len)[None, :]
    mask = k_idx <= q_idx
    if window is not None:
        mask = mask & (k_idx > q_idx - window)
    mask = mask[None, None, None]
    if q_segment_ids is not None:
        same_BxTxS = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & same_BxTxS[:, None, None]
    return mask


def resolve(implementation: str, dtype, head_dim: int, length: int, softcap: float | None = None,
            sinks: bool = False) -> str:
    """The implementation "auto" stands for on this platform, or the one asked for (checked). Attention
    sinks (gpt-oss) have "xla" and "reference" only."""
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"model.attention: {implementation!r} must be one of {IMPLEMENTATIONS}")
    if sinks:
        if implementation in ("cudnn", "splash"):
            raise UserError(f"attention sinks (gpt-oss) are implemented by model.attention='xla' and 'reference', "
                            f"not by model.attention={implementation!r}")
        return "xla" if implementation == "auto" else implementation
    platform = current_platform()
    cudnn_ok = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
                and softcap is None)
    if implementation == "auto":
        if platform == "tpu" and length % 128 == 0:
            return "splash"
        return "cudnn" if platform == "gpu" and cudnn_ok else "xla"
    if implementation == "cudnn" and (platform != "gpu" or not cudnn_ok):
        raise UserError(
            f"model.attention='cudnn' needs a GPU and bf16/fp16 inputs with head_dim a multiple of 8 up to 128, "
            f"without soft-capping; got platform {platform!r}, dtype {jnp.dtype(dtype).name}, head_dim {head_dim}, "
            f"softcap {softcap}"
        )
    return implementation


def layout_order(length: int, shards: int, layout: str = "zigzag") -> np.ndarray | None:
    """The original position of each position of the split layout (None: the natural order). The zigzag
    layout needs 2 x shards chunks; a length without them keeps the natural order (still correct)."""
    if shards == 1 or layout == "contiguous" or length % (2 * shards):
        return None
    chunks = np.arange(length, dtype=np.int32).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])
