"""Training-loop overhead: `fit` (live data pipeline, metrics, progress callback) vs a bare loop of the
jitted step over the same batches, on the default job (tiny Decoder, mesh 2x2x2, 8 simulated CPU devices);
and `fit` over the pre-built batches, which separates the loop's own cost from the pipeline's CPU time.

    python benchmarks/loop_overhead.py [--steps 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("override", nargs="*", help="config overrides, e.g. data.worker_count=1")
    args = parser.parse_args()
    from sft_sharded.parallel.devices import simulate_cpu_devices

    simulate_cpu_devices(8)
    import jax

    from sft_sharded.run import build_trainer, init_state
    from sft_sharded.config import load_config
    from sft_sharded.data.pipeline import make_iterator
    from sft_sharded.data.tokenizers import ByteTokenizer
    from sft_sharded.metrics import MetricsWriter
    from sft_sharded.parallel.sharding import global_batch
    from sft_sharded.trainers.loop import fit

    cfg = load_config(None, [f"steps={args.steps}", *args.override])
    tok = ByteTokenizer()
    trainer = build_trainer(cfg)
    it = make_iterator(cfg.data, tok, seed=cfg.seed)
    batches = [next(it) for _ in range(args.steps)]

    def bare() -> float:
        state = init_state(trainer, cfg)
        state, metrics = trainer.train_step(state, global_batch(batches[0], trainer.mesh))  # compile, warm
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for batch in batches[1:]:
            state, metrics = trainer.train_step(state, global_batch(batch, trainer.mesh))
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    def full(live_data: bool = True) -> float:
        state = init_state(trainer, cfg)
        live = make_iterator(cfg.data, tok, seed=cfg.seed) if live_data else iter(batches)
        state, metrics = trainer.train_step(state, global_batch(next(live), trainer.mesh))  # compile, warm
        jax.block_until_ready(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            writer = MetricsWriter(tmp)
            start = time.perf_counter()
            state, _ = fit(trainer, state, live, steps=args.steps, log_every=cfg.log_every, on_record=writer.write)
            jax.block_until_ready(state)
            elapsed = time.perf_counter() - start
            writer.enabled = False  # no loss.png in the timing
        return elapsed

    bare_s = min(bare() for _ in range(args.repeats))
    full_s = min(full() for _ in range(args.repeats))
    # The same loop over the pre-built batches: what fit itself costs, without the pipeline's CPU time.
    prebuilt_s = min(full(live_data=False) for _ in range(args.repeats))
    ratio = full_s / bare_s
    print(f"{args.steps - 1} steps: bare jitted loop {bare_s:.2f} s, full loop {full_s:.2f} s: "
          f"{(ratio - 1) * 100:+.1f}%; fit over pre-built batches {prebuilt_s:.2f} s: "
          f"{(prebuilt_s / bare_s - 1) * 100:+.1f}% (best of {args.repeats})")
    print(json.dumps({"steps": args.steps - 1, "bare_s": bare_s, "full_s": full_s, "ratio": ratio,
                      "prebuilt_s": prebuilt_s, "prebuilt_ratio": prebuilt_s / bare_s}))


if __name__ == "__main__":
    main()
