"""Forward + backward time of one attention layer for each implementation that runs on this platform.

    python benchmarks/attention_speed.py [--batch 8 --seq 512 --heads 8 --kv-heads 8 --head-dim 32 --dtype bfloat16]

Packed rows (three documents and padding in every other row), a random cotangent; the median of timed
repeats after a compile, and the largest difference from the reference's output and gradients.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sft_sharded.models import attention as attn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("batch", 8), ("seq", 512), ("heads", 8), ("kv-heads", 8), ("head-dim", 32), ("repeats", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    shape_q = (args.batch, args.seq, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq, args.kv_heads, args.head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(s), args.dtype) for s in (shape_q, shape_kv, shape_kv))
    cotangent = jnp.asarray(rng.standard_normal(shape_q), jnp.float32)
    row = np.repeat([1, 2, 3, 0], [args.seq // 3, args.seq // 3, args.seq - 2 * (args.seq // 3) - 8, 8])
    segments = jnp.asarray(np.stack([row if i % 2 == 0 else np.ones(args.seq, int) for i in range(args.batch)]),
                           jnp.int32)

    platform = jax.default_backend()
    impls = ["reference", "xla"] + (["cudnn"] if platform == "gpu" else []) + (["splash"] if platform == "tpu" else [])
    results, reference = {}, None
    for impl in impls:
        fn = functools.partial(attn.attention, implementation=impl)

        def loss(q, k, v, fn=fn):
            return jnp.sum(fn(q, k, v, segments).astype(jnp.float32) * cotangent)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        out = jax.block_until_ready(step(q, k, v))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(q, k, v))
            times.append(time.perf_counter() - start)
        grads = [np.asarray(g, np.float32) for g in out[1]]
        reference = reference or grads
        diff = max(float(np.max(np.abs(g - r))) for g, r in zip(grads, reference))
        results[impl] = {"ms": 1e3 * statistics.median(times), "max_grad_diff_vs_reference": diff}
        print(f"{impl:>10}: {results[impl]['ms']:8.1f} ms fwd+bwd, max |grad - reference| {diff:.3g}")
    print(json.dumps({"platform": platform, "shape_q": shape_q, "dtype": args.dtype, "results": results}))


if __name__ == "__main__":
    main()
