"""Our train step and MaxText's, compiled in one process and timed in alternating windows.

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu DECOUPLE_GCLOUD=TRUE $MT_VENV/bin/python benchmarks/maxtext_ab.py \\
        [--devices 8] [--rounds 8 --window 3] [--rusage 5]

`maxtext_side_by_side.sh` runs each system in a process of its own, one after the other; on a machine
whose speed drifts from minute to minute the ratio of two such runs moves by more than the systems differ
(benchmarks/README.md). Here both steps see the same drift, round by round, as in `step_ab.py`. The shape is
the side-by-side one (hidden 256, 4 layers, 8 heads x 32, mlp 1024, vocab 8192, seq 512, 8 rows: 4,096 tokens
per step, bf16 compute over float32 weights, AdamW); 8 devices are simulated CPU devices with fsdp=8. Ours
scans its layers without remat (its fastest setting here), MaxText runs its defaults (scan, full remat), each
on a synthetic batch of its own format. Both run under the same jax, in MaxText's venv with sft_sharded on
PYTHONPATH, each under the jax config it sets (MaxText's `initialize` changes some globally: they apply
to its calls only). Prints the median step time of each and the median over rounds of each round's ratio
(MaxText / ours: above 1, ours is faster); the last line is JSON. Both share the process's malloc, which
moves the 8-device row (XLA:CPU maps each step's buffers afresh under glibc's): preload tcmalloc with
`LD_PRELOAD=.../libtcmalloc_minimal.so.4` to measure both without that cost (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import tempfile
import time

# timing is a sibling module: python puts benchmarks/ on the path
from timing import alternate, summarize

SHAPE = dict(hidden=256, layers=4, heads=8, head_dim=32, kv_heads=8, mlp=1024, vocab=8192, seq=512, rows=8)


def maxtext_argv(devices: int, out_dir: str) -> list[str]:
    """The arguments `maxtext_cpu_baseline.sh` gives MaxText's trainer for the same shape."""
    import maxtext

    s = SHAPE
    per_device = ["per_device_batch_size=8"] if devices == 1 else [
        f"per_device_batch_size={s['rows'] // devices}", f"ici_fsdp_parallelism={devices}"]
    return ["train", os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml"), "run_name=ab",
            f"base_output_directory={out_dir}", "hardware=cpu", "steps=100", "dataset_type=synthetic",
            "enable_checkpointing=false", f"base_emb_dim={s['hidden']}", f"base_num_query_heads={s['heads']}",
            f"base_num_kv_heads={s['kv_heads']}", f"base_mlp_dim={s['mlp']}",
            f"base_num_decoder_layers={s['layers']}", f"head_dim={s['head_dim']}", f"vocab_size={s['vocab']}",
            f"max_target_length={s['seq']}", "attention=dot_product", "skip_jax_distributed_system=true",
            *per_device]


def with_config(values: dict, fn):
    """`fn` run with these jax config values, put back afterwards: each system's step is traced and run
    under the settings it chose (MaxText's `initialize` sets some globally, e.g. removing size-one mesh axes
    from sharding types, under which our 8-device step ran slower in an A/B, benchmarks/README.md)."""
    import jax

    def run():
        before = {key: jax.config.values[key] for key in values}
        for key, value in values.items():
            jax.config.update(key, value)
        try:
            return fn()
        finally:
            for key, value in before.items():
                jax.config.update(key, value)

    return run


def maxtext_step(devices: int, out_dir: str):
    """MaxText's compiled train step as its train loop builds it, its state and a synthetic batch: a
    function that runs one step and waits for it, under the jax config MaxText's `initialize` set."""
    import jax
    from flax import nnx
    from flax.core.spmd import logical_axis_rules
    from maxtext.trainers.pre_train import train
    from maxtext.utils import maxtext_utils, sharding, train_utils

    defaults = dict(jax.config.values)
    config, recorder = train.initialize(maxtext_argv(devices, out_dir))
    chosen = {key: value for key, value in jax.config.values.items() if defaults.get(key) != value}
    for key in chosen:  # back to jax's defaults outside MaxText's own calls
        jax.config.update(key, defaults[key])
    print(f"jax config MaxText's initialize sets, for its own calls only: {chosen}")

    def build():
        _, _, state_shardings, _, mesh, _, _, _, _, evals, state = train_utils.setup_train_loop(config, recorder)
        jit_model, state = nnx.split(state)
        params_shardings, state_shardings = sharding.maybe_update_params_sharding_with_opt(config, state_shardings)
        p_train_step, _ = train_utils.jit_train_and_eval_step(config, jit_model, mesh, state, state_shardings,
                                                              train.train_step, train.eval_step, evals,
                                                              params_shardings)
        with jax.set_mesh(mesh), logical_axis_rules(config.logical_axis_rules):
            shaped = maxtext_utils.get_shaped_batch(config,
                                                    batch_sharding=sharding.get_input_data_sharding(config, mesh))
            batch = train.make_synthetic_batch(config, shaped)
        return p_train_step, mesh, state, batch

    p_train_step, mesh, state, batch = with_config(chosen, build)()
    holder = {"state": state}

    def step() -> None:
        with jax.set_mesh(mesh), logical_axis_rules(config.logical_axis_rules):
            holder["state"], metrics = p_train_step(holder["state"], batch)
        jax.block_until_ready(metrics)

    return with_config(chosen, step)


def our_step(devices: int):
    import jax
    import jax.numpy as jnp

    from timing import bench_trainer, synthetic_batch

    from sft_sharded import DecoderConfig

    s = SHAPE
    cfg = DecoderConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_layers=s["layers"],
                        num_heads=s["heads"], head_dim=s["head_dim"], num_kv_heads=s["kv_heads"], mlp_dim=s["mlp"],
                        dtype="bfloat16", param_dtype="float32", scan_layers=True)
    trainer = bench_trainer(cfg, s["rows"], s["seq"], "mesh.data=1", f"mesh.fsdp={devices}", "mesh.tensor=1")
    holder = {"state": trainer.create_train_state(jax.random.key(0), jnp.zeros((s["rows"], s["seq"]), jnp.int32))}
    batch = synthetic_batch(cfg, s["rows"], s["seq"], trainer.mesh)

    def step() -> None:
        holder["state"], metrics = trainer.train_step(holder["state"], batch)
        jax.block_until_ready(metrics)

    return step


def window(step, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rusage_per_step(step, n: int) -> dict:
    """Per step over `n` steps: wall time, the process's user and system CPU (every thread: XLA's run the
    step) and its minor page faults (new pages the kernel maps and zeroes)."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        step()
    after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    return {"step_s": elapsed / n, "user_s": (after.ru_utime - before.ru_utime) / n,
            "system_s": (after.ru_stime - before.ru_stime) / n,
            "minor_faults": (after.ru_minflt - before.ru_minflt) / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8, choices=(1, 8))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--window", type=int, default=3, help="steps per system per round (their median is timed)")
    p.add_argument("--rusage", type=int, default=0, metavar="N",
                   help="then N steps of each system with CPU time and page faults per step (`rusage_per_step`)")
    args = p.parse_args()
    if args.devices > 1:  # before jax starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} " \
                                  f"--xla_force_host_platform_device_count={args.devices}".strip()
    with tempfile.TemporaryDirectory() as out_dir:
        steps = {"maxtext": maxtext_step(args.devices, out_dir), "ours": our_step(args.devices)}
        for step in steps.values():  # compile, then one more step before timing
            step()
            step()
        # ours first in even rounds, MaxText first in odd ones
        times = alternate({name: functools.partial(window, steps[name], args.window) for name in ("ours", "maxtext")},
                          args.rounds)
        usage = {name: rusage_per_step(steps[name], args.rusage) for name in ("ours", "maxtext")} if args.rusage else {}
    result, ratios = summarize(times, SHAPE["rows"] * SHAPE["seq"], "maxtext", "ours")
    result.update(devices=args.devices, median_ratio=statistics.median(ratios), ratios=[round(r, 4) for r in ratios])
    print(f"{args.devices} device(s): ours {result['ours']['tokens_per_sec']:,.0f} tokens/s, MaxText "
          f"{result['maxtext']['tokens_per_sec']:,.0f}; median of {args.rounds} rounds' MaxText/ours step time: "
          f"{result['median_ratio']:.3f}")
    for name, per_step in usage.items():
        result[name]["rusage"] = per_step
        print(f"{name}, per step over {args.rusage}: {per_step['step_s']:.3f} s, user {per_step['user_s']:.2f} s, "
              f"system {per_step['system_s']:.3f} s, {per_step['minor_faults']:,.0f} minor page faults")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
