"""sft-sharded train [--config FILE.yaml] [KEY=VALUE ...]

jax is imported only after the config is read, so `simulate_devices` can set up CPU devices first.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from sft_sharded.config import TrainConfig, dump_config, load_config, to_dict


def _simulate_devices(count: int) -> None:
    """Ask XLA for `count` host (CPU) devices. Must run before jax starts; accelerators are unaffected."""
    if count <= 0:
        return
    if "jax" in sys.modules:
        print(f"warning: simulate_devices={count} ignored: jax was imported before the config was read", file=sys.stderr)
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])


class PreemptionFlag:
    """SIGTERM (and, on multi-host TPU, jax's preemption sync point) asks the loop to save and stop at the
    next step boundary."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def reached(self, step: int) -> bool:
        import jax
        from jax.experimental import multihost_utils

        sync_point = getattr(multihost_utils, "reached_preemption_sync_point", None)
        if not self.flag and sync_point is not None and jax.process_count() > 1 and jax.devices()[0].platform == "tpu":
            self.flag = bool(sync_point(step))
        return self.flag


def jax_process_count() -> int:
    import jax

    return jax.process_count()


def _progress(cfg: TrainConfig, record: dict) -> str:
    if "compile_and_first_step_s" in record:
        return f"step {record['step']}: loss {record['loss']:.4f}, compiled and ran in {record['compile_and_first_step_s']:.1f}s"
    eta = (cfg.steps - record["step"]) * record["step_time_s"]
    done = int(20 * record["step"] / cfg.steps)
    return (f"[{'#' * done}{'.' * (20 - done)}] step {record['step']:>5}/{cfg.steps}  loss {record['loss']:.4f}  "
            f"acc {record.get('accuracy', float('nan')):.2%}  {record['tokens_per_sec']:,.0f} tok/s  "
            f"eta {eta // 60:.0f}m{eta % 60:02.0f}s")


def train(cfg: TrainConfig) -> list[dict]:
    import jax

    from sft_sharded.checkpoint import Checkpointer, save_params
    from sft_sharded.data.pipeline import make_iterator, open_records, scan_counts
    from sft_sharded.data.tokenizers import load_tokenizer
    from sft_sharded.generate import exact_match
    from sft_sharded.metrics import MetricsWriter, flops_per_token
    from sft_sharded.trainers.loop import evaluate, fit

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    main_process = jax.process_index() == 0
    say = print if main_process else (lambda *a, **k: None)

    tokenizer = load_tokenizer(_tokenizer_path(cfg))
    counts = scan_counts(cfg.data, tokenizer, cfg.seed)
    say(f"data: {counts['scanned']:,} records scanned{' (all)' if counts['complete'] else ''}: "
        f"{counts['kept']:,} kept, {counts['truncated']:,} truncated, {counts['too_long']:,} dropped as too long, "
        f"{counts['no_target']:,} dropped with no trained token, {counts['template']:,} dropped by the chat template",
        flush=True)

    trainer, state = _build_trainer(cfg, tokenizer)
    mesh, model_cfg = trainer.mesh, trainer.model.config
    say(f"model: {model_cfg.num_params() / 1e6:.2f}M params on {len(mesh.devices.flat)} "
        f"{jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}; {cfg.steps} steps of "
        f"{cfg.data.batch_size}x{cfg.data.max_length} tokens; run dir {run_dir}", flush=True)

    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    batches = make_iterator(cfg.data, tokenizer, seed=cfg.seed, **shard)
    c = cfg.checkpoint
    ckpt = Checkpointer(run_dir / "checkpoints", every=c.every, keep=c.keep, keep_every=c.keep_every,
                        async_save=c.async_save)
    restored = ckpt.restore_latest(trainer.abstract_state)
    resumed_step = 0
    if restored is not None:
        state, data_state, resumed_step = restored
        if "unavailable" in data_state and cfg.data.shard_by == "rows":
            batches.set_state(data_state["process_0"])  # every process has the same stream: any state fits
        elif "unavailable" in data_state:
            # Another process count shards the records differently: restart the order with a new shuffle
            # seed rather than replay the first batches (model and optimizer state are exact).
            batches = make_iterator(cfg.data, tokenizer, seed=cfg.seed + resumed_step, **shard)
            say(f"warning: {data_state['unavailable']}; the data order restarts (seed {cfg.seed + resumed_step})")
        else:
            batches.set_state(data_state)
        say(f"resumed from {ckpt.directory}/{resumed_step}", flush=True)
    has_eval = cfg.data.path is None or cfg.data.eval_path is not None
    eval_fn = None
    if has_eval:
        def eval_fn(state):
            return evaluate(trainer, state, make_iterator(cfg.data, tokenizer, split="eval", seed=cfg.seed, **shard))

    writer = MetricsWriter(run_dir, enabled=main_process, resumed_step=resumed_step)
    config_dict = to_dict(cfg)
    preempted = PreemptionFlag()
    interactive = sys.stdout.isatty()

    def after_step(step: int, state) -> bool:
        if preempted.reached(step):
            ckpt.save(step, state, batches.get_state(), config_dict, force=True)
            ckpt.wait()
            say(f"{chr(10) if interactive else ''}preempted: saved {ckpt.directory}/{step}; exiting", flush=True)
            return True
        ckpt.save(step, state, batches.get_state(), config_dict)
        return False

    def on_record(record: dict) -> None:
        if "loss" in record:
            record["packing_efficiency"] = batches.efficiency
        writer.write(record)
        if "eval_loss" in record:
            say(f"{'' if not interactive else chr(10)}step {record['step']:>5}  eval loss {record['eval_loss']:.4f}  "
                f"held-out token accuracy {record.get('eval_accuracy', float('nan')):.2%}", flush=True)
        elif "loss" in record:
            say(("\r" if interactive else "") + _progress(cfg, record), end="" if interactive else "\n", flush=True)

    t0 = time.perf_counter()
    state, records = fit(trainer, state, batches, steps=cfg.steps, log_every=cfg.log_every,
                         eval_every=cfg.eval.every, eval_fn=eval_fn, on_record=on_record, after_step=after_step,
                         flops_per_token=flops_per_token(model_cfg, cfg.data.max_length))
    ckpt.close()
    if preempted.flag:
        writer.close()
        return records
    say(f"{'' if not interactive else chr(10)}trained {cfg.steps} steps in {time.perf_counter() - t0:.1f}s; "
        f"packing efficiency {batches.efficiency:.1%}", flush=True)
    if has_eval:
        eval_records = open_records(cfg.data, "eval", cfg.seed)  # opened once (a JSONL source indexes its file)
        held_out = [eval_records[i][0] for i in range(min(len(eval_records), cfg.eval.num_generate))]
        accuracy, pairs = exact_match(trainer, state.params, held_out, tokenizer, cfg.eval.max_new_tokens)
        final = {"step": cfg.steps, "eval_exact_match": accuracy, "eval_generated": len(pairs)}
        writer.write(final)
        records.append(final)
        wrong = [(a, b) for a, b in pairs if a != b][:3]
        say(f"held-out exact match (greedy generation): {accuracy:.2%} of {len(pairs)}"
            + (f"; e.g. expected {wrong[0][0]!r}, got {wrong[0][1]!r}" if wrong else ""), flush=True)
    writer.close()
    save_params(run_dir, state.params)
    return records


def _build_trainer(cfg: TrainConfig, tokenizer):
    """Mesh, model, optimizer and the sharded initial state of a config."""
    import jax
    import jax.numpy as jnp

    from sft_sharded import hf
    from sft_sharded.models import Llama, preset
    from sft_sharded.optim import make_optimizer
    from sft_sharded.sharding import make_mesh
    from sft_sharded.trainers import SFTTrainer, TrainState

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    m = cfg.model
    options = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
                   attention=m.attention)
    model_cfg = hf.config_from_hf(m.path, **options) if m.path else preset(m.preset, **options)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.preset={m.preset!r} has vocab_size {model_cfg.vocab_size} < the tokenizer's "
                         f"{tokenizer.vocab_size}")
    trainer = SFTTrainer(
        Llama(model_cfg), make_optimizer(cfg.optim, cfg.steps), mesh=mesh, grad_accum_steps=cfg.optim.grad_accum_steps,
        loss_chunk_size=cfg.loss.chunk_size, z_loss=cfg.loss.z_loss,
    )
    dummy = jnp.zeros((cfg.data.batch_size, cfg.data.max_length), jnp.int32)
    if not m.path:
        return trainer, trainer.create_train_state(jax.random.key(cfg.seed), dummy)
    # Pretrained weights: only the shapes and shardings of a fresh state are computed (no random params on
    # the devices), the params come tensor by tensor from the safetensors, the optimizer state from them.
    trainer.abstract_only = True
    trainer.create_train_state(jax.random.key(cfg.seed), dummy)
    trainer.abstract_only = False
    shardings = trainer.state_shardings
    params = hf.load_params(m.path, model_cfg, trainer.abstract_state.params)
    opt_state = jax.jit(trainer.optimizer.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return trainer, TrainState(params, opt_state, step)


def _tokenizer_path(cfg: TrainConfig) -> str | None:
    """tokenizer.path, else the model directory when it holds a tokenizer.json."""
    if cfg.tokenizer.path is None and cfg.model.path and (Path(cfg.model.path) / "tokenizer.json").is_file():
        return cfg.model.path
    return cfg.tokenizer.path


def export(run_dir: str, out_dir: str, dtype: str) -> Path:
    """A run's final params (else its newest checkpoint) as a Hugging Face directory."""
    import json as json_lib

    from sft_sharded import hf
    from sft_sharded.checkpoint import FINAL_PARAMS, Checkpointer, load_params
    from sft_sharded.data.tokenizers import load_tokenizer

    cfg = load_config(Path(run_dir) / "config.yaml")
    tokenizer_path = _tokenizer_path(cfg)
    trainer, _ = _build_trainer(cfg, load_tokenizer(tokenizer_path))
    if (Path(run_dir) / FINAL_PARAMS).is_dir():
        params = load_params(run_dir, trainer.abstract_state.params)
    else:
        restored = Checkpointer(Path(run_dir) / "checkpoints", every=0, keep=1).restore_latest(trainer.abstract_state)
        if restored is None:
            raise FileNotFoundError(f"{run_dir}: no final_params/ and no checkpoint to export")
        params = restored[0].params
    model_cfg = trainer.model.config
    model_type = "qwen2" if model_cfg.qkv_bias else "llama"
    if cfg.model.path:
        model_type = json_lib.loads((Path(cfg.model.path) / "config.json").read_text())["model_type"]
    return hf.save_pretrained(params, model_cfg, out_dir, model_type=model_type, dtype=dtype,
                              tokenizer_dir=tokenizer_path)


def generate(run_dir: str, prompts: list[str], max_new_tokens: int, raw: bool) -> list[str]:
    """Greedy answers of a trained run to user messages (or raw text prompts with `raw`)."""
    from sft_sharded.checkpoint import load_params
    from sft_sharded.data.tokenizers import load_tokenizer
    from sft_sharded.generate import greedy_generate, prompt_and_answer

    cfg = load_config(Path(run_dir) / "config.yaml")
    tokenizer = load_tokenizer(_tokenizer_path(cfg))
    trainer, _ = _build_trainer(cfg, tokenizer)
    params = load_params(run_dir, trainer.abstract_state.params)
    records = [{"prompt": p, "completion": ""} if raw else
               {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]} for p in prompts]
    ids = [prompt_and_answer(r, tokenizer)[0] for r in records]
    outs = greedy_generate(trainer, params, ids, max_new_tokens, tokenizer.stop_ids)
    return [tokenizer.decode(o) for o in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sft-sharded", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train (no arguments: the built-in task on 8 simulated devices)")
    p_train.add_argument("--config", help="YAML file of config keys")
    p_train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. steps=100 optim.lr=1e-3")
    p_gen = sub.add_parser("generate", help="greedy answers from a trained run directory")
    p_gen.add_argument("--run-dir", required=True, help="a run directory written by `sft-sharded train`")
    p_gen.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    p_gen.add_argument("--max-new-tokens", type=int, default=64)
    p_gen.add_argument("--raw", action="store_true", help="plain text prompts, no chat template")
    p_export = sub.add_parser("export", help="write a run's weights as a Hugging Face directory")
    p_export.add_argument("--to", choices=["hf"], default="hf")
    p_export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p_export.add_argument("run_dir")
    p_export.add_argument("out_dir")
    p_plan = sub.add_parser("plan", help="compile the train step for a TPU topology on this CPU host (AOT)")
    from sft_sharded.plan import add_arguments

    add_arguments(p_plan)
    args = parser.parse_args(argv)
    if args.command == "plan":
        from sft_sharded import plan

        return plan.main(args)
    config_path = Path(args.run_dir) / "config.yaml" if args.command in ("generate", "export") else args.config
    try:
        cfg = load_config(config_path, getattr(args, "overrides", ()))
    except (ValueError, OSError) as err:
        parser.exit(2, f"sft-sharded: config error: {err}\n")
    _simulate_devices(cfg.simulate_devices)
    from sft_sharded import distributed

    distributed.initialize()
    if args.command == "train":
        try:
            train(cfg)
        except BaseException as err:
            if not isinstance(err, SystemExit) and jax_process_count() > 1:
                # Name the process: with many processes a bare traceback does not say whose it is.
                print(f"sft-sharded: {distributed.describe()} failed: {type(err).__name__}: {err}",
                      file=sys.stderr, flush=True)
            raise
    elif args.command == "export":
        print(f"wrote {export(args.run_dir, args.out_dir, args.dtype)}")
    else:
        for prompt, answer in zip(args.prompt, generate(args.run_dir, args.prompt, args.max_new_tokens, args.raw)):
            print(f"{prompt} -> {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
