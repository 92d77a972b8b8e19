"""Train-step time of a small mixture of experts (8 experts, top 2) against the dense model with the same
active parameters per token (mlp 2 x the expert width), on simulated CPU devices.
Usage: python benchmarks/moe_step.py [--devices 8] [--mesh 1,8,1] [--expert 1] [--moe-only]"""

import argparse

from sft_sharded.parallel.devices import simulate_cpu_devices
from timing import bench_trainer, median_step_s, synthetic_batch  # a sibling: python puts benchmarks/ on the path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor")
    p.add_argument("--expert", type=int, default=1, help="expert-parallel groups (the mesh's expert axis)")
    p.add_argument("--moe-only", action="store_true", help="skip the dense baseline")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    simulate_cpu_devices(args.devices)
    import jax
    import jax.numpy as jnp
    from sft_sharded import DecoderConfig

    data, fsdp, tensor = args.mesh.split(",")
    mesh_keys = (f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", f"mesh.expert={args.expert}")
    shape = dict(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=1024,
                 scan_layers=True)
    variants = {"dense (mlp 1024)": DecoderConfig(**shape),
                "moe 8 experts top-2 (expert mlp 512)": DecoderConfig(**shape, num_experts=8, experts_per_token=2,
                                                                      moe_mlp_dim=512, router_aux_loss_coef=0.01)}
    for name, cfg in variants.items():
        if args.moe_only and not cfg.num_experts:
            continue
        trainer = bench_trainer(cfg, 16, 256, *mesh_keys)
        mesh = trainer.mesh
        batch = synthetic_batch(cfg, 16, 256, mesh)
        state = trainer.create_train_state(jax.random.key(0), jnp.zeros((16, 256), jnp.int32))
        step, state, metrics = median_step_s(trainer, state, batch, args.steps, warmup=2)
        print(f"{name:40s} params {cfg.num_params() / 1e6:6.2f}M active {cfg.num_active_params() / 1e6:6.2f}M "
              f"step {step * 1e3:7.1f} ms  {16 * 256 / step:9,.0f} tokens/s  mesh {dict(mesh.shape)}", flush=True)


if __name__ == "__main__":
    main()
