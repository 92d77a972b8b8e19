# Compile time of one train step for gemma3-1b-shaped layers (26 layers, 5 local : 1 global), scanned with
# lax.cond per layer vs unrolled, on the CPU (8 simulated devices, fsdp=8), tiny width so compile dominates.
import sys, time, dataclasses
from sft_sharded.devices import simulate_cpu_devices
simulate_cpu_devices(8)
import jax, jax.numpy as jnp, numpy as np, optax
from sft_sharded import Decoder, SFTTrainer, make_mesh
from sft_sharded.models import preset
from sft_sharded.sharding import global_batch
for scan in (True, False):
    for mixed in (True, False):
        cfg = preset("gemma3-1b", vocab_size=1024, hidden_size=128, num_heads=4, num_kv_heads=1, head_dim=32,
                     mlp_dim=256, sliding_window=64, scan_layers=scan, remat="full")
        if not mixed:
            cfg = dataclasses.replace(cfg, layer_types=None, sliding_window=None, rope_local_theta=None)
        mesh = make_mesh(1, 8, 1)
        trainer = SFTTrainer(Decoder(cfg), optax.adamw(1e-4), mesh=mesh)
        state = trainer.abstract_train_state(jax.random.key(0), jnp.zeros((8, 256), jnp.int32))
        ids = np.ones((8, 256), np.int32)
        batch = global_batch({"input_ids": ids, "labels": ids, "loss_mask": np.ones_like(ids, bool)}, mesh)
        t = time.perf_counter()
        trainer.lower("train", state, batch).compile()
        print(f"scan={scan} mixed_layers={mixed}: compile {time.perf_counter() - t:.1f} s", flush=True)
