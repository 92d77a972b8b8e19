"""CPU time per record of the data pipeline: read, shuffle, encode (chat template, tokenizer, mask) and pack,
measured as the thread's CPU time around whole packed chunks, so other threads and processes do not count.

    python benchmarks/record_cost.py [--chunks 4] [--rounds 6] [override ...]

On two cores shared with the step this cost is what the live pipeline takes from the step (see
`loop_overhead.py`); with `data.path` and `tokenizer.path` overrides it measures a real dataset.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4, help="packed chunks (data.pack_buffer records) per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("override", nargs="*", help="config overrides, e.g. data.pack_buffer=512")
    args = parser.parse_args()

    from sft_sharded.config import load_config
    from sft_sharded.data.pipeline import Encode, PackChunk, open_records
    from sft_sharded.data.tokenizers import load_tokenizer
    from sft_sharded.run import tokenizer_path

    cfg = load_config(None, args.override)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    encoded = open_records(cfg.data, "train", cfg.seed).shuffle(seed=cfg.seed).map(Encode(cfg.data, tokenizer))
    pack = PackChunk(encoded, cfg.data)
    pack(0)  # the template's compilation and first-call costs are not per record
    per_record, batches = [], []
    for r in range(args.rounds):
        chunks = range(1 + r * args.chunks, 1 + (r + 1) * args.chunks)
        start = time.thread_time()
        rows = [len(pack(c)[0]) for c in chunks]
        per_record.append((time.thread_time() - start) / (len(chunks) * cfg.data.pack_buffer))
        batches.append(sum(rows) / cfg.data.batch_size)
    us = statistics.median(per_record) * 1e6
    records_per_batch = len(chunks) * cfg.data.pack_buffer / statistics.median(batches)
    print(f"{us:.1f} us of CPU per record (median of {args.rounds} rounds of {args.chunks} x "
          f"{cfg.data.pack_buffer} records; rounds {min(per_record) * 1e6:.1f}-{max(per_record) * 1e6:.1f}); "
          f"{records_per_batch:.1f} records per {cfg.data.batch_size} x {cfg.data.max_length} batch: "
          f"{us * records_per_batch / 1e3:.1f} ms per batch")
    print(json.dumps({"us_per_record": us, "rounds_us": [p * 1e6 for p in per_record],
                      "records_per_batch": records_per_batch}))


if __name__ == "__main__":
    main()
