"""Train-step time and per-device memory with a row's positions split over the mesh's context axis, on
simulated CPU devices: the same 4 rows x `--seq` positions on 4 devices, split by rows (fsdp=4) or by
positions (context=2, 4), each scheme and layout. Simulated devices share this host's cores, so the times
show the overhead of the split (collectives, permutation, smaller blocks), not a speed-up.
Usage: python benchmarks/context_step.py [--seq 8192] [--steps 3]"""

import argparse
import dataclasses

from sft_sharded.parallel.devices import simulate_cpu_devices
from timing import bench_trainer, median_step_s  # a sibling: python puts benchmarks/ on the path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    simulate_cpu_devices(4)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sft_sharded import DecoderConfig
    from sft_sharded.metrics import memory_per_device
    from sft_sharded.parallel.sharding import global_batch

    rows, seq = 4, args.seq
    base = DecoderConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=1024,
                         scan_layers=True, remat="full", attention="xla")
    variants = [("fsdp=4 (whole rows)", dict(fsdp=4), {})]
    for context in (2, 4):
        for scheme in ("allgather", "ring"):
            variants.append((f"context={context} {scheme} zigzag", dict(fsdp=4 // context, context=context),
                             dict(context_attention=scheme)))
    variants.append(("context=4 allgather contiguous", dict(fsdp=1, context=4), dict(context_layout="contiguous")))
    ids = np.random.default_rng(0).integers(1, 1024, (rows, seq)).astype(np.int32)
    for name, sizes, options in variants:
        cfg = dataclasses.replace(base, **options)
        trainer = bench_trainer(cfg, rows, seq, "mesh.data=1", "mesh.tensor=1", "loss.chunk_size=1024",
                                *(f"mesh.{axis}={size}" for axis, size in sizes.items()))
        mesh = trainer.mesh
        state = trainer.create_train_state(jax.random.key(0), jnp.zeros((rows, seq), jnp.int32))
        batch = global_batch({"input_ids": ids, "labels": np.roll(ids, -1, 1)}, mesh)
        memory = memory_per_device(trainer.lower("train", state, batch).compile())
        step, state, metrics = median_step_s(trainer, state, batch, args.steps, warmup=1)
        print(f"{name:34s} step {step:7.2f} s  {rows * seq / step:8,.0f} tokens/s  {memory / 2**20:7.1f} MiB per "
              f"device  loss {float(metrics['loss']):.4f}", flush=True)


if __name__ == "__main__":
    main()
