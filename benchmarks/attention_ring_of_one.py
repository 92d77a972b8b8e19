"""Both jax attention kernels are folds of `flash`; do they need two loops? The local "xla" attention (its
query blocks' key spans known at trace time) against the split-sequence kernel run as a ring of one (one
shard: a scan over key blocks with a visibility test per block), forward and backward, on one CPU device at
the side-by-side shape. Reaches into `split`'s private setup on purpose: no public call runs it unsplit.

    python benchmarks/attention_ring_of_one.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sft_sharded.models.attention import blockwise, flash, split
from sft_sharded.models.attention.layout import layout_order
from sft_sharded.parallel.sharding import make_mesh

B, T, N, K, H = 8, 512, 8, 8, 32


def main() -> None:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.bfloat16) for _ in range(2))
    seg, scale = jnp.ones((B, T), jnp.int32), H ** -0.5

    def local(q, k, v):
        out = blockwise.blocked_attention(q.reshape(B, T, K, N // K, H), k, v, seg, None, blockwise.block_size(T),
                                          None, scale, None)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    spec = P(None, "context", None, None)
    rows = split._pieces(layout_order(T, 1, "contiguous"), T, 1)
    setup = split._Setup("allgather", "contiguous", "context", 1, flash.Options(None, scale, None), rows, spec, spec)

    def ring_of_one(q, k, v):
        return jnp.sum(split._split_attention(q, k, v, seg, setup).astype(jnp.float32) ** 2)

    with jax.set_mesh(make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])):
        for name, fn in (("local blocked (xla)", local), ("split kernel, one shard", ring_of_one)):
            step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
            jax.block_until_ready(step(q, k, v))
            times = []
            for _ in range(5):
                start = time.perf_counter()
                jax.block_until_ready(step(q, k, v))
                times.append(time.perf_counter() - start)
            print(f"{name}: forward+backward {np.median(times) * 1e3:.1f} ms (B={B} T={T} heads={N} "
                  f"head_dim={H}, bf16, {jax.devices()[0].device_kind})", flush=True)


if __name__ == "__main__":
    main()
