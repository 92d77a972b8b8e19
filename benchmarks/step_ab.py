"""Two variants of one train step, compiled in one process and timed in alternating windows.

    python benchmarks/step_ab.py --mesh 1,8,1 --simulate-devices 8 --scan \\
        --a scan_layers=true --b scan_layers=false [--rounds 8 --window 3]

On a shared machine whose speed drifts from minute to minute, two processes run one after the other can
differ by more than the change under test; here both steps see the same drift, round by round, and the
result is the median over rounds of each round's ratio of step times (A / B: below 1, A is faster).
A variant is `FIELD=VALUE,...` of the model's DecoderConfig (VALUE as JSON, else a string), a run config
key with a dot (`loss.chunk_size=256`), an XLA option (`xla_cpu_use_onednn=false`, added to the trainer's
compiler options), or `xla_defaults=true`: compiled with XLA's default options instead of the trainer's.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics

from sft_sharded.parallel.devices import simulate_cpu_devices
# timing is a sibling module: python puts benchmarks/ on the path
from timing import (add_shape_arguments, alternate, bench_trainer, median_step_s, model_config, summarize,
                    synthetic_batch)


def parse_variant(text: str) -> dict:
    """`FIELD=VALUE,...` -> {FIELD: VALUE}; VALUE as JSON where it parses, else the string itself."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"step_ab.py: variant item {item!r} is not FIELD=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--a", default="", help="variant A: FIELD=VALUE,... (empty: the arguments as given)")
    p.add_argument("--b", default="", help="variant B")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--window", type=int, default=3, help="steps per variant per round (their median is timed)")
    args = p.parse_args()
    simulate_cpu_devices(args.simulate_devices or 0)

    import jax
    import jax.numpy as jnp

    base = model_config(args)
    data, fsdp, tensor = args.mesh.split(",")
    runs = {}
    for name, text in (("a", args.a), ("b", args.b)):
        variant = parse_variant(text)
        xla_defaults = bool(variant.pop("xla_defaults", False))
        keys = [f"{k}={json.dumps(variant.pop(k))}" for k in [k for k in variant if "." in k]]
        options = {k: variant.pop(k) for k in [k for k in variant if k.startswith("xla_")]}
        try:
            cfg = dataclasses.replace(base, **variant)
        except TypeError as err:  # a field DecoderConfig does not have, named by the error
            raise SystemExit(f"step_ab.py: --{name} {text!r}: {err}") from None
        trainer = bench_trainer(cfg, args.batch, args.seq, f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                                f"mesh.tensor={tensor}", *keys)
        trainer.compiler_options = {} if xla_defaults else {**trainer.compiler_options, **options}
        state = trainer.create_train_state(jax.random.key(0), jnp.zeros((args.batch, args.seq), jnp.int32))
        batch = synthetic_batch(cfg, args.batch, args.seq, trainer.mesh)
        state, metrics = trainer.train_step(state, batch)  # compile
        jax.block_until_ready(metrics)
        runs[name] = {"trainer": trainer, "state": state, "batch": batch}

    def window(run) -> float:
        seconds, run["state"], _ = median_step_s(run["trainer"], run["state"], run["batch"], args.window, warmup=0)
        return seconds

    times = alternate({name: functools.partial(window, runs[name]) for name in ("a", "b")}, args.rounds)
    per_variant, ratios = summarize(times, args.batch * args.seq, "a", "b")
    result = {name: {"variant": text, **per_variant[name]} for name, text in (("a", args.a), ("b", args.b))}
    result["median_ratio_a_over_b"] = statistics.median(ratios)
    result["ratios"] = [round(r, 4) for r in ratios]
    print(f"A ({args.a or 'as given'}) {result['a']['median_step_s']:.3f} s, B ({args.b or 'as given'}) "
          f"{result['b']['median_step_s']:.3f} s per step; median of {args.rounds} rounds' A/B: "
          f"{result['median_ratio_a_over_b']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
