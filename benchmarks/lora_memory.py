"""Full fine-tuning vs LoRA and QLoRA: per-device bytes of the train state (trained params, optimizer state, frozen
base), the compiled step's per-device memory, and (where it runs on this CPU) the step time.

usage: python benchmarks/lora_memory.py [--rank 16] [--steps 10]
Shapes: the comparison model (hidden 256, 4 layers, 8 heads x 32, mlp 1024, vocab 8192, seq 512, batch 8,
bf16 compute) on one device, timed; and llama3.2-1b at seq 2048, batch 8 on 8 simulated devices (fsdp=8),
compiled only.
"""

from __future__ import annotations

import argparse
import json
from sft_sharded.parallel.devices import simulate_cpu_devices
from timing import bench_trainer, median_step_s  # a sibling: python puts benchmarks/ on the path


def state_bytes(tree) -> int:
    """Bytes one device holds of a (possibly abstract) sharded tree (4-bit values count half a byte, as
    XLA packs them on TPU and GPU)."""
    import jax
    import numpy as np

    def bits(dtype) -> int:
        return 4 if str(dtype) in ("int4", "uint4") else np.dtype(dtype).itemsize * 8

    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * bits(x.dtype) // 8 for x in jax.tree.leaves(tree))


def measure(cfg, mesh, batch: int, seq: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sft_sharded.metrics import memory_per_device
    from sft_sharded.parallel.sharding import batch_sharding, global_batch

    trainer = bench_trainer(cfg, batch, seq, mesh=mesh)
    abstract = trainer.abstract_train_state(jax.random.key(0), jax.ShapeDtypeStruct((batch, seq), jnp.int32))
    sh = batch_sharding(mesh)
    batch_spec = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sh) for k in ("input_ids", "labels")}
    compiled = trainer.lower("train", abstract, batch_spec).compile()
    out = {"trained_params_bytes": state_bytes(abstract.params), "optimizer_bytes": state_bytes(abstract.opt_state),
           "frozen_bytes": state_bytes(abstract.frozen) if abstract.frozen is not None else 0,
           "step_bytes_per_device": memory_per_device(compiled)}
    if steps:
        state = trainer.create_train_state(jax.random.key(0), jnp.zeros((batch, seq), jnp.int32))
        ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, seq)).astype(np.int32)
        data = global_batch({"input_ids": ids, "labels": np.roll(ids, -1, 1)}, mesh)
        out["step_s"] = median_step_s(trainer, state, data, steps, warmup=2)[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    simulate_cpu_devices(8)
    import dataclasses

    import jax

    from sft_sharded import DecoderConfig, make_mesh
    from sft_sharded.models import preset
    from sft_sharded.config import LoraConfig

    comparison = DecoderConfig(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32,
                             mlp_dim=1024, dtype="bfloat16", scan_layers=True)
    shapes = [("comparison", comparison, make_mesh(1, 1, 1, devices=jax.devices()[:1]), 8, 512, args.steps),
              ("llama3.2-1b", preset("llama3.2-1b", dtype="bfloat16", scan_layers=True, remat="full"),
               make_mesh(1, 8, 1), 8, 2048, 0)]
    for name, cfg, mesh, batch, seq, steps in shapes:
        modes = [("full", None)] + [(f"lora-{dtype}", LoraConfig(rank=args.rank, base_dtype=dtype))
                                    for dtype in ("float32", "bfloat16", "int8", "nf4")]
        for mode, lora in modes:
            result = measure(dataclasses.replace(cfg, lora=lora), mesh, batch, seq, steps)
            print(json.dumps({"model": name, "mode": mode, "devices": mesh.devices.size, **result}), flush=True)


if __name__ == "__main__":
    main()
