"""Train-step compile time of gemma3-1b's 26 layers (5 local : 1 global) at a tiny width: scanned (one body,
lax.cond per layer) vs unrolled, mixed vs all-global, on 8 simulated CPU devices (fsdp=8).
Usage: python benchmarks/compile_mixed_layers.py"""

import dataclasses
import time

from sft_sharded.parallel.devices import simulate_cpu_devices

simulate_cpu_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sft_sharded import make_mesh  # noqa: E402
from sft_sharded.models import preset  # noqa: E402
from sft_sharded.parallel.sharding import global_batch  # noqa: E402
from timing import bench_trainer  # noqa: E402  # a sibling: python puts benchmarks/ on the path


def main():
    mesh = make_mesh(1, 8, 1)
    ids = np.ones((8, 256), np.int32)
    batch = global_batch({"input_ids": ids, "labels": ids, "loss_mask": np.ones_like(ids, bool)}, mesh)
    for scan in (True, False):
        for mixed in (True, False):
            cfg = preset("gemma3-1b", vocab_size=1024, hidden_size=128, num_heads=4, num_kv_heads=1, head_dim=32,
                         mlp_dim=256, sliding_window=64, scan_layers=scan, remat="full")
            if not mixed:
                cfg = dataclasses.replace(cfg, layer_types=None, sliding_window=None, rope_local_theta=None)
            trainer = bench_trainer(cfg, 8, 256, mesh=mesh)
            state = trainer.abstract_train_state(jax.random.key(0), jnp.zeros((8, 256), jnp.int32))
            start = time.perf_counter()
            trainer.lower("train", state, batch).compile()
            print(f"scan={scan} mixed_layers={mixed}: compile {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
