"""Tokens/s through the data pipeline (read + tokenize + chat template + pack + batch) vs the trainer.

    python benchmarks/data_throughput.py [--records 100000] [--workers 0 2] [--batches 200]
        [--max-length 131072 --pack-buffer 16384 --batch-size 4]  # long rows for the pipeline only

Writes a JSONL of multi-turn conversations, times the pipeline with each worker count, then times the
default model's train step on the default mesh (8 simulated CPU devices) on the same batches. The last
line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def write_conversations(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "the a cat dog sat ran on under mat box quickly slowly why how what is are reverse sort".split()
    with path.open("w") as f:
        for _ in range(count):
            turns = []
            for _ in range(rng.randint(1, 3)):
                turns.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(3, 12)))})
                turns.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(3, 20)))})
            f.write(json.dumps({"messages": turns}) + "\n")


def time_pipeline(cfg, batches: int) -> tuple[float, float]:
    from sft_sharded.data.pipeline import make_iterator
    from sft_sharded.data.tokenizers import ByteTokenizer

    it = make_iterator(cfg, ByteTokenizer(), seed=0)
    next(it)  # start-up (workers, first chunk) is not throughput
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += next(it)["input_ids"].size
    return tokens / (time.perf_counter() - start), it.efficiency


def time_trainer(cfg, steps: int) -> float:
    import jax

    from sft_sharded.run import build_trainer, init_state
    from sft_sharded.data.pipeline import make_iterator
    from sft_sharded.data.tokenizers import ByteTokenizer
    from sft_sharded.parallel.sharding import global_batch

    trainer = build_trainer(cfg)
    state = init_state(trainer, cfg)
    it = make_iterator(cfg.data, ByteTokenizer(), seed=0)
    batches = [global_batch(next(it), trainer.mesh) for _ in range(steps + 2)]
    for batch in batches[:2]:
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in batches[2:]:
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    return steps * batches[0]["input_ids"].size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--trainer-steps", type=int, default=30)
    parser.add_argument("--max-length", type=int, help="pipeline rows of this length (the trainer keeps the default)")
    parser.add_argument("--pack-buffer", type=int, help="examples packed together (fill long rows)")
    parser.add_argument("--batch-size", type=int, help="pipeline rows per batch")
    args = parser.parse_args()

    from sft_sharded.parallel.devices import simulate_cpu_devices

    simulate_cpu_devices(8)
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    import dataclasses

    from sft_sharded.config import load_config

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chats.jsonl"
        start = time.perf_counter()
        write_conversations(path, args.records)
        print(f"wrote {args.records:,} conversations in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        base = load_config(None, [f"data.path={path}"])
        long_rows = {key: getattr(args, key) for key in ("max_length", "pack_buffer", "batch_size")
                     if getattr(args, key) is not None}
        for workers in args.workers:
            cfg = dataclasses.replace(base.data, worker_count=workers, **long_rows)
            rate, eff = time_pipeline(cfg, args.batches)
            results[f"pipeline_tokens_per_sec_workers_{workers}"] = round(rate)
            print(f"pipeline, {workers} workers: {rate:,.0f} tokens/s (packing efficiency {eff:.1%})", file=sys.stderr)
        trainer_rate = time_trainer(base, args.trainer_steps)
    results["trainer_tokens_per_sec_default_model"] = round(trainer_rate)
    best = max(v for k, v in results.items() if k.startswith("pipeline"))
    results["pipeline_over_trainer"] = round(best / trainer_rate, 1)
    print(f"trainer (default model, mesh 2x2x2 on 8 simulated CPU devices): {trainer_rate:,.0f} tokens/s; "
          f"pipeline / trainer = {results['pipeline_over_trainer']}x", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":  # grain workers re-import __main__
    main()
