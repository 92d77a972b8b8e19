"""Train-step throughput on synthetic batches: tokens/s, model TFLOP/s, MFU, compile time, memory.

    python benchmarks/step_throughput.py --hidden 256 --layers 4 --heads 8 --head-dim 32 --kv-heads 8 \\
        --mlp 1024 --vocab 8192 --seq 512 --batch 8 --mesh 1,8,1 --simulate-devices 8 --dtype bfloat16

Warm-up steps, then the median of timed steps (each blocked on). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sft_sharded.parallel.devices import simulate_cpu_devices
# timing is a sibling module: python puts benchmarks/ on the path
from timing import add_shape_arguments, bench_trainer, median_step_s, model_config, profile_steps, synthetic_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--loss-chunk", type=int, default=None)
    p.add_argument("--xla-defaults", action="store_true",
                   help="compile with XLA's default options (no Trainer.compiler_options, e.g. YNN fusion back on CPU)")
    p.add_argument("--hlo-file", default=None, help="write the compiled step's optimized HLO text here")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", metavar="DIR", help="then trace --profile-steps steps into DIR and print where "
                   "their time goes (sft_sharded.step_profile)")
    p.add_argument("--profile-steps", type=int, default=3)
    args = p.parse_args()
    simulate_cpu_devices(args.simulate_devices or 0)

    import jax
    import jax.numpy as jnp

    from sft_sharded.metrics import flops_per_token, memory_per_device, mfu, peak_flops
    from sft_sharded.models.attention import choose_kernel

    cfg = model_config(args)
    data, fsdp, tensor = args.mesh.split(",")
    trainer = bench_trainer(cfg, args.batch, args.seq, f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                            f"mesh.tensor={tensor}", f"loss.chunk_size={args.loss_chunk or 0}")
    if args.xla_defaults:
        trainer.compiler_options = {}
    mesh = trainer.mesh
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((args.batch, args.seq), jnp.int32))
    batch = synthetic_batch(cfg, args.batch, args.seq, mesh)

    start = time.perf_counter()
    compiled = trainer.lower("train", state, batch).compile()
    compile_s = time.perf_counter() - start
    bytes_per_device = memory_per_device(compiled)
    if args.hlo_file:
        with open(args.hlo_file, "w") as f:
            f.write(compiled.as_text())
    step_s, state, metrics = median_step_s(trainer, state, batch, args.steps, args.warmup)
    tokens = args.batch * args.seq
    devices = mesh.devices.size
    fpt = flops_per_token(cfg, args.seq)
    peak = peak_flops(mesh.devices.flat[0].device_kind)  # None on CPU: MFU is then NaN
    real_tokens_per_sec = float(metrics["num_real_tokens"]) / step_s
    result = {
        "tokens_per_sec": tokens / step_s, "tokens_per_sec_per_device": tokens / step_s / devices,
        "step_time_s": step_s, "model_tflops_per_sec_per_device": tokens / step_s * fpt / devices / 1e12,
        "mfu": mfu(tokens / step_s, fpt, devices, peak),
        # Synthetic rows have no padding, so real tokens are all tokens here; counted by the step all the same.
        "real_tokens_per_sec": real_tokens_per_sec, "mfu_real_tokens": mfu(real_tokens_per_sec, fpt, devices, peak),
        "compile_s": compile_s, "bytes_per_device": bytes_per_device, "params": cfg.num_params(),
        "device": mesh.devices.flat[0].device_kind,
        "attention": choose_kernel(args.attention, cfg.dtype, cfg.head_size, args.seq, cfg.attn_softcap),
        "compiler_options": trainer.compiler_options, "devices": devices, "mesh": dict(mesh.shape),
        "final_loss": float(metrics["loss"]),
    }
    print(f"{'device':>10} {'mesh':>28} {'tokens/s':>10} {'step s':>8} {'TFLOP/s/dev':>12} {'MFU':>6} "
          f"{'compile s':>9} {'MiB/dev':>8}", file=sys.stderr)
    print(f"{result['device'][:10]:>10} {str(tuple(mesh.shape.values())):>28} {result['tokens_per_sec']:>10,.0f} "
          f"{step_s:>8.3f} {result['model_tflops_per_sec_per_device']:>12.4f} {result['mfu']:>6.1%} "
          f"{compile_s:>9.1f} {bytes_per_device / 2**20:>8.1f}", file=sys.stderr)
    if args.profile:
        result["profile_s_per_step"] = profile_steps(trainer, state, batch, args.profile, args.profile_steps,
                                                     compiled.as_text())
    print(json.dumps({k: (None if isinstance(v, float) and v != v else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
