"""Which kernel attends: `choose_kernel` says what a `model.attention` name stands for on this platform, for
a whole sequence on each device or, with `split`, per shard of a sequence split on the mesh's context
axis. A kernel asked for by name that cannot run there is refused, never replaced."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from sft_sharded.choices import ATTENTION_IMPLEMENTATIONS
from sft_sharded.errors import UserError
from sft_sharded.models.attention.layout import chunk_length
from sft_sharded.parallel.sharding import current_platform

FUSED = ("splash", "cudnn")


class Split(NamedTuple):
    """A sequence split on the mesh: its scheme ("ring", "allgather"), shards and layout."""

    scheme: str
    shards: int
    layout: str


def choose_kernel(implementation: str, dtype, head_dim: int, length: int, softcap: float | None = None,
                  sinks: bool = False, split: Split | None = None) -> str:
    """Without `split`: "reference", "xla", "splash" or "cudnn". With it: the fused kernel that runs per
    shard ("splash" or "cudnn": the all-gather scheme, chunks that splash's 128 or cuDNN's 2 divide), else
    "jax" (the blockwise kernels of `split.py`). Attention sinks (gpt-oss) have "xla" and "reference" only."""
    local = _local(implementation, dtype, head_dim, length, softcap, sinks)
    if split is None:
        return local
    if local not in FUSED:
        return "jax"
    chunk, multiple = chunk_length(length, split.shards, split.layout), 128 if local == "splash" else 2
    if split.scheme == "allgather" and length % multiple == 0 and chunk % multiple == 0:
        return local
    if implementation == local:
        raise UserError(f"model.attention={local!r} on a sequence split by mesh.context needs "
                        f"model.context_attention=allgather (got {split.scheme!r}) and query chunks of a multiple of "
                        f"{multiple} positions (got {chunk}: {length} positions, {split.shards} shards, "
                        f"{split.layout} layout)")
    return "jax"


def _local(implementation: str, dtype, head_dim: int, length: int, softcap: float | None, sinks: bool) -> str:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"model.attention: {implementation!r} must be one of {ATTENTION_IMPLEMENTATIONS}")
    if sinks:
        if implementation in FUSED:
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
