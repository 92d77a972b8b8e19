"""sft-sharded train [--config FILE.yaml] [KEY=VALUE ...]

jax is imported only after the config is read, so `simulate_devices` can set up CPU devices first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from sft_sharded.config import TrainConfig, dump_config, load_config


def _simulate_devices(count: int) -> None:
    """Ask XLA for `count` host (CPU) devices. Must run before jax starts; accelerators are unaffected."""
    if count <= 0:
        return
    if "jax" in sys.modules:
        print(f"warning: simulate_devices={count} ignored: jax was imported before the config was read", file=sys.stderr)
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])


def train(cfg: TrainConfig) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from sft_sharded.data import synthetic
    from sft_sharded.data.tokenizers import ByteTokenizer
    from sft_sharded.models import Llama, preset
    from sft_sharded.optim import make_optimizer
    from sft_sharded.sharding import make_mesh
    from sft_sharded.trainers import SFTTrainer
    from sft_sharded.trainers.loop import evaluate, fit

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tok = ByteTokenizer()
    m = cfg.model
    model_cfg = preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers)
    if model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.preset={m.preset!r} has vocab_size {model_cfg.vocab_size} < the tokenizer's {tok.vocab_size}")
    trainer = SFTTrainer(
        Llama(model_cfg), make_optimizer(cfg.optim, cfg.steps), mesh=mesh, grad_accum_steps=cfg.optim.grad_accum_steps
    )
    dummy = jnp.zeros((cfg.data.batch_size, cfg.data.max_length), jnp.int32)
    state = trainer.create_train_state(jax.random.key(cfg.seed), dummy)
    print(
        f"sft-sharded: {model_cfg.num_params() / 1e6:.2f}M params on {len(mesh.devices.flat)} "
        f"{jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}; {cfg.steps} steps of "
        f"{cfg.data.batch_size}x{cfg.data.max_length} tokens; run dir {run_dir}",
        flush=True,
    )
    held_out = synthetic.eval_batches(cfg.data, cfg.seed, tok)
    metrics_file = (run_dir / "metrics.jsonl").open("w")

    def on_record(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if "eval_loss" in record:
            print(f"step {record['step']:>5}  eval loss {record['eval_loss']:.4f}  "
                  f"held-out token accuracy {record.get('eval_accuracy', float('nan')):.2%}", flush=True)
        else:
            eta = (cfg.steps - record["step"]) * record["step_time_s"]
            print(f"step {record['step']:>5}/{cfg.steps}  loss {record['loss']:.4f}  "
                  f"acc {record.get('accuracy', float('nan')):.2%}  {record['tokens_per_sec']:,.0f} tok/s  "
                  f"eta {eta:,.0f}s", flush=True)

    t0 = time.perf_counter()
    _, records = fit(
        trainer, state, synthetic.train_batches(cfg.data, cfg.seed, tok), steps=cfg.steps,
        log_every=cfg.log_every, eval_every=cfg.eval.every,
        eval_fn=lambda s: evaluate(trainer, s, held_out), on_record=on_record,
    )
    metrics_file.close()
    final = records[-1]
    print(f"done in {time.perf_counter() - t0:.1f}s: held-out loss {final['eval_loss']:.4f}, "
          f"held-out token accuracy {final['eval_accuracy']:.2%} ({int(final['eval_num_tokens'])} answer tokens)")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sft-sharded", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train (no arguments: the built-in task on 8 simulated devices)")
    p_train.add_argument("--config", help="YAML file of config keys")
    p_train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. steps=100 optim.lr=1e-3")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, OSError) as err:
        parser.exit(2, f"sft-sharded: config error: {err}\n")
    _simulate_devices(cfg.simulate_devices)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
