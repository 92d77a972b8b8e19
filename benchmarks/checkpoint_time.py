"""Checkpoint save time, blocking (until training may continue) and total (until on disk).

    python benchmarks/checkpoint_time.py [--saves 3]

Full train state (params + AdamW state + step) on mesh 2x2x2 over 8 simulated CPU devices, for the default
`tiny` model and a ~100M-parameter Llama. Prints a table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from timing import bench_trainer  # a sibling: python puts benchmarks/ on the path


def measure(name: str, cfg, saves: int) -> dict:
    import jax
    import jax.numpy as jnp
    from sft_sharded.rundir.checkpoint import Checkpointer

    trainer = bench_trainer(cfg, 8, 64, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 64), jnp.int32))
    jax.block_until_ready(state)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(tmp, every=1, keep=2)
        for step in range(1, saves + 1):
            start = time.perf_counter()
            ckpt.save(step, state, {"chunks": {}, "taken": 0}, {"bench": name})
            blocking = time.perf_counter() - start
            ckpt.wait()
            rows.append({"blocking_s": round(blocking, 3), "total_s": round(time.perf_counter() - start, 3)})
        ckpt.close()
    return {"model": name, "params": cfg.num_params(), "state_bytes": state_bytes, "saves": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    from sft_sharded.parallel.devices import simulate_cpu_devices

    simulate_cpu_devices(8)
    from sft_sharded.models import DecoderConfig, preset

    models = {
        "tiny (default)": preset("tiny"),
        "llama-100m": DecoderConfig(vocab_size=16384, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                                  mlp_dim=2560),
    }
    results = [measure(name, cfg, args.saves) for name, cfg in models.items()]
    for r in results:
        saves = ", ".join(f"{s['blocking_s']:.3f}/{s['total_s']:.3f}" for s in r["saves"])
        print(f"{r['model']:>16}: {r['params'] / 1e6:7.1f}M params, state {r['state_bytes'] / 2**20:8.1f} MiB; "
              f"save blocking/total s: {saves}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
