"""Train-step time and memory of a Qwen3.5-shaped model (three Gated DeltaNet layers to one full-attention
layer) against the same model with every layer full attention, on one CPU device, at a row of `--seq`
positions. The linear layers' cost grows with the length, the full layers' with its square, so the gap
widens with the sequence. Usage: python benchmarks/linear_attention_step.py [--seq 2048 16384] [--steps 2]"""

import argparse
import dataclasses

from timing import bench_trainer, median_step_s  # a sibling: python puts benchmarks/ on the path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sft_sharded import DecoderConfig, make_mesh
    from sft_sharded.metrics import memory_per_device
    from sft_sharded.parallel.sharding import global_batch

    hybrid = DecoderConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                           mlp_dim=768, qk_norm=True, norm_plus_one=True, attention_output_gate=True, rotary_dim=16,
                           layer_types=("linear_attention",) * 3 + ("full_attention",), linear_key_heads=2,
                           linear_value_heads=4, linear_key_dim=64, linear_value_dim=64, remat="full",
                           attention="xla")
    dense = dataclasses.replace(hybrid, layer_types=("full_attention",) * 4)
    mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
    for seq in args.seq:
        ids = np.random.default_rng(0).integers(1, 4096, (1, seq)).astype(np.int32)
        for name, cfg in (("Qwen3.5-shaped (3 linear : 1 full)", hybrid), ("all full attention", dense)):
            trainer = bench_trainer(cfg, 1, seq, "loss.chunk_size=1024", mesh=mesh)
            state = trainer.create_train_state(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))
            batch = global_batch({"input_ids": ids, "labels": np.roll(ids, -1, 1)}, mesh)
            memory = memory_per_device(trainer.lower("train", state, batch).compile())
            step, state, metrics = median_step_s(trainer, state, batch, args.steps, warmup=1)
            print(f"seq {seq:6d}  {name:36s} {cfg.num_params() / 1e6:5.2f}M params  step {step:7.2f} s  "
                  f"{seq / step:8,.0f} tokens/s  {memory / 2**20:8.1f} MiB  loss {float(metrics['loss']):.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
