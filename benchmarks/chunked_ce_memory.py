"""Compiled train-step memory with and without the chunked cross entropy, at a 128k vocabulary.

    python benchmarks/chunked_ce_memory.py [--vocab 128256] [--seq 1024] [--batch 8] [--chunk 256]

Compiles (does not run) the real train step on 8 simulated CPU devices (fsdp=8) and reads
`memory_analysis()`: temporaries, and arguments + outputs + temporaries - aliases per device.
"""

from __future__ import annotations

import argparse
import json

from timing import bench_trainer  # a sibling: python puts benchmarks/ on the path


def measure(vocab: int, seq: int, batch: int, chunk: int | None) -> dict:
    import jax
    import jax.numpy as jnp
    from sft_sharded import DecoderConfig
    from sft_sharded.metrics import memory_per_device
    from sft_sharded.parallel.sharding import batch_sharding

    cfg = DecoderConfig(vocab_size=vocab, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=1024,
                      dtype="bfloat16")
    trainer = bench_trainer(cfg, batch, seq, "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1",
                            f"loss.chunk_size={chunk or 0}")
    state = trainer.abstract_train_state(jax.random.key(0), jax.ShapeDtypeStruct((batch, seq), jnp.int32))
    sh = batch_sharding(trainer.mesh)
    batch_tree = {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sh),
                  "labels": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sh),
                  "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_, sharding=sh)}
    compiled = trainer.lower("train", state, batch_tree).compile()
    return {"chunk": chunk, "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "total_bytes": memory_per_device(compiled)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args()
    from sft_sharded.parallel.devices import simulate_cpu_devices

    simulate_cpu_devices(8)
    plain = measure(args.vocab, args.seq, args.batch, None)
    chunked = measure(args.vocab, args.seq, args.batch, args.chunk)
    mib = 2**20
    for r in (plain, chunked):
        print(f"chunk {str(r['chunk']):>5}: temporaries {r['temp_bytes'] / mib:9.1f} MiB, "
              f"args+outputs+temps-aliases {r['total_bytes'] / mib:9.1f} MiB per device")
    ratio = plain["temp_bytes"] / chunked["temp_bytes"]
    print(f"temporaries {ratio:.1f}x smaller with the chunked cross entropy")
    print(json.dumps({"vocab": args.vocab, "seq": args.seq, "batch": args.batch, "plain": plain, "chunked": chunked,
                      "temp_ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
