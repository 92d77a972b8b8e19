"""Training-loop overhead: `fit` (live data pipeline, metrics, progress callback) vs a bare loop of the
jitted step over the same batches, on the default job (tiny Decoder, mesh 2x2x2, 8 simulated CPU devices);
and `fit` over the pre-built batches, which separates the loop's own cost from the pipeline's CPU time.

    python benchmarks/loop_overhead.py [--steps 100] [--repeats 3] [--spare-core]

`--spare-core` runs the step on all cores but the last and the data pipeline's threads on the last one, as on
an accelerator host, where the step leaves the CPU to the pipeline (Linux: per-thread CPU affinity).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time


def on_cores(cores: set[int], build):
    """`build()` run in a thread pinned to `cores`; threads it starts (grain's read-ahead) inherit them."""
    out: dict = {}

    def target() -> None:
        os.sched_setaffinity(0, cores)  # pid 0: the calling thread only
        try:
            out["value"] = build()
        except BaseException as err:  # re-raised in the caller's thread
            out["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spare-core", action="store_true", help="the pipeline on a core of its own")
    parser.add_argument("override", nargs="*", help="config overrides, e.g. data.worker_count=1")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.spare_core and len(cores) < 2:
        parser.error(f"--spare-core needs 2 cores or more; this process may use {len(cores)}")
    pipeline_cores = {cores[-1]} if args.spare_core else set(cores)
    if args.spare_core:  # before jax starts its thread pools, which inherit the main thread's cores
        os.sched_setaffinity(0, set(cores[:-1]))
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
        if live_data:  # grain's read-ahead thread starts at the first batch, on the pipeline's cores
            live = on_cores(pipeline_cores, lambda: make_iterator(cfg.data, tok, seed=cfg.seed))
            first = on_cores(pipeline_cores, lambda: next(live))
        else:
            live = iter(batches)
            first = next(live)
        state, metrics = trainer.train_step(state, global_batch(first, trainer.mesh))  # compile, warm
        jax.block_until_ready(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            writer = MetricsWriter(tmp)
            start = time.perf_counter()
            state, _ = fit(trainer, state, live, steps=args.steps, log_every=cfg.log_every, on_record=writer.write)
            jax.block_until_ready(state)
            elapsed = time.perf_counter() - start
            writer.enabled = False  # no loss.png in the timing
        return elapsed

    # Interleaved, so that a slow spell of a shared machine reaches all three alike. The loop over the
    # pre-built batches is what fit itself costs, without the pipeline's CPU time.
    times = [(bare(), full(), full(live_data=False)) for _ in range(args.repeats)]
    bare_s, full_s, prebuilt_s = (min(column) for column in zip(*times))
    # Each repeat's own ratios, whose median a slow spell of a few seconds moves less than the minima.
    paired = (statistics.median(f / b for b, f, _ in times), statistics.median(p / b for b, _, p in times))
    ratio = full_s / bare_s
    print(f"{args.steps - 1} steps: bare jitted loop {bare_s:.2f} s, full loop {full_s:.2f} s: "
          f"{(ratio - 1) * 100:+.1f}%; fit over pre-built batches {prebuilt_s:.2f} s: "
          f"{(prebuilt_s / bare_s - 1) * 100:+.1f}% (best of {args.repeats}); median of each repeat's ratios: "
          f"{paired[0]:.3f} live, {paired[1]:.3f} pre-built"
          + (f"; step on cores {cores[:-1]}, pipeline on {cores[-1]}" if args.spare_core else ""))
    print(json.dumps({"steps": args.steps - 1, "bare_s": bare_s, "full_s": full_s, "ratio": ratio,
                      "prebuilt_s": prebuilt_s, "prebuilt_ratio": prebuilt_s / bare_s,
                      "median_ratio": paired[0], "median_prebuilt_ratio": paired[1], "times": times,
                      "spare_core": args.spare_core}))


if __name__ == "__main__":
    main()
