"""Peak memory (RSS) of the data pipeline on a JSONL file larger than the machine's memory.

    python benchmarks/data_rss.py --gib 26 --dir /tmp/rss [--batches 300] [--keep]

Writes a JSONL of multi-turn conversations of `--gib` GiB (a block of distinct conversations written over
and over, each line made unique by its index), then in a fresh process opens it as `data.path` with the
default data settings (global shuffle, packing) and pulls `--batches` batches. Reports the file size, the
machine's memory, the time to index the file, and the process's peak RSS before opening the data, after
indexing and after the batches (`resource.getrusage`, which counts file pages mapped and read as well).
The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from data_throughput import write_conversations  # a sibling: python puts benchmarks/ on the path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_big(path: Path, gib: float) -> int:
    block_path = path.with_suffix(".block")
    write_conversations(block_path, 20_000, seed=1)
    block = [json.loads(line) for line in block_path.read_text().splitlines()]
    block_path.unlink()
    for record in block:  # reasoning-trace sized records (a few KB): repeat each turn's text
        for turn in record["messages"]:
            turn["content"] = " ".join([turn["content"]] * 12)
    target, written, index = int(gib * 2**30), 0, 0
    with path.open("w") as f:
        while written < target:
            lines = []
            for record in block:
                lines.append(json.dumps({"id": index, **record}) + "\n")
                index += 1
            chunk = "".join(lines)
            f.write(chunk)
            written += len(chunk)
    return index


def measure(path: Path, batches: int) -> dict:
    from sft_sharded.config import load_config
    from sft_sharded.data.pipeline import make_iterator
    from sft_sharded.data.tokenizers import ByteTokenizer

    out = {"rss_mib_before_data": round(peak_rss_mib())}
    data = load_config(None, [f"data.path={path}", "data.max_length=2048", "data.batch_size=16"]).data
    start = time.perf_counter()
    it = make_iterator(data, ByteTokenizer(), seed=0)
    next(it)
    out["index_and_first_batch_s"] = round(time.perf_counter() - start, 1)
    out["rss_mib_after_index"] = round(peak_rss_mib())
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += next(it)["input_ids"].size
    out["tokens_per_sec"] = round(tokens / (time.perf_counter() - start))
    out["batches"] = batches
    out["peak_rss_mib"] = round(peak_rss_mib())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=26.0)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--keep", action="store_true", help="keep the file (reused by the next run)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the fresh process's own entry
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches)))
        return
    path = args.dir / "big.jsonl"
    args.dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        start = time.perf_counter()
        path.with_suffix(".count").write_text(str(write_big(path, args.gib)))
        print(f"wrote {path.stat().st_size / 2**30:.1f} GiB in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    proc = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--measure", str(path),
                           "--batches", str(args.batches)], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.splitlines()[-1])
    result.update(file_gib=round(path.stat().st_size / 2**30, 2), records=int(path.with_suffix(".count").read_text()),
                  machine_memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1))
    if not args.keep:
        path.unlink()
        path.with_suffix(".count").unlink()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
