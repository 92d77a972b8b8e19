"""A run assembled from a TrainConfig: the composition root that the CLI, benchmarks and tests share.

`build_trainer` (mesh, model, optimizer), `abstract_state` (shapes and shardings, nothing allocated),
`init_state` (fresh or from a Hugging Face directory), `restore_or_init` (state and data iterator
together), `train` (the loop with checkpoints and the final evaluation), `export` and `generate` (from a
run directory, without an optimizer state or the base checkpoint). Every check of the user's input runs
before the first compile and before anything in the run directory is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from etils import epath

from sft_sharded import hf, paths
from sft_sharded.checkpoint import FINAL_PARAMS, Checkpointer, load_params, save_params
from sft_sharded.config import DataConfig, TrainConfig, dump_config, load_config, to_dict
from sft_sharded.data import report
from sft_sharded.data.pipeline import make_iterator, open_records, resume_iterator, scan
from sft_sharded.data.tokenizers import load_tokenizer
from sft_sharded.errors import TrainingDiverged, UserError
from sft_sharded.lock import RunLock, check_free
from sft_sharded.memory import advice, check_fits
from sft_sharded.models import Decoder, DecoderConfig, preset
from sft_sharded.models.presets import loss_chunk
from sft_sharded.models.lora import LoraConfig
from sft_sharded.optim import make_optimizer
from sft_sharded.sharding import context_size, data_parallel_size, make_mesh
from sft_sharded.state import (abstract_state, base_fingerprint, base_weights, frozen_base, init_state,
                               with_frozen_base)
from sft_sharded.tracking import check_trackers, make_trackers
from sft_sharded.trainers import SFTTrainer, TrainState, partition

Say = Callable[[str], None]


def model_config(cfg: TrainConfig) -> DecoderConfig:
    """The preset, or the config.json of `model.path`, with the run's dtype/remat/scan/attention options."""
    m = cfg.model
    options = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
                   attention=m.attention, context_attention=m.context_attention, lora=lora_config(cfg))
    try:
        return hf.config_from_hf(m.path, **options) if m.path else preset(m.preset, **options)
    except UserError:
        raise
    except (ValueError, TypeError) as err:  # DecoderConfig's own checks of the model.* options
        raise UserError(f"model: {err}") from None


def lora_config(cfg: TrainConfig) -> LoraConfig | None:
    """The model's LoRA config from the `lora` section (None when lora.rank is 0)."""
    c = cfg.lora
    if not c.rank:
        return None
    try:
        return LoraConfig(rank=c.rank, alpha=c.alpha, targets=tuple(c.targets), rslora=c.rslora,
                          base_dtype=c.base_dtype, dropout=c.dropout)
    except ValueError as err:
        raise UserError(str(err)) from None


def lora_off_note(cfg: TrainConfig) -> str | None:
    """A line when `lora.*` keys are set but lora.rank is 0 (full fine-tuning: they do nothing)."""
    if cfg.lora.rank:
        return None
    default = type(cfg.lora)()
    unused = [f"lora.{f.name}" for f in dataclasses.fields(cfg.lora)
              if getattr(cfg.lora, f.name) != getattr(default, f.name)]
    return (f"LoRA is off (lora.rank=0: every weight trains); {', '.join(unused)} "
            f"{'is' if len(unused) == 1 else 'are'} set and not used") if unused else None


def tokenizer_path(cfg: TrainConfig) -> str | None:
    """tokenizer.path, else the model directory when it holds a tokenizer.json."""
    if cfg.tokenizer.path is None and cfg.model.path and (
            paths.path(cfg.model.path, "model.path") / "tokenizer.json").is_file():
        return cfg.model.path
    return cfg.tokenizer.path


def build_trainer(cfg: TrainConfig, model_cfg: DecoderConfig | None = None) -> SFTTrainer:
    """Mesh, model and optimizer of a config; checks that the global batch splits over the mesh."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, expert=cfg.mesh.expert, context=cfg.mesh.context)
    dp, k = data_parallel_size(mesh), cfg.optim.grad_accum_steps
    if cfg.data.batch_size % dp:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is not divisible by the data-parallel size "
                        f"mesh.data x mesh.fsdp x mesh.expert = {dp} (mesh {dict(mesh.shape)})")
    length_key = "max_length" if cfg.data.packing else "pad_to_multiple_of"  # what fixes the rows' length
    if getattr(cfg.data, length_key) % context_size(mesh):
        raise UserError(f"data.{length_key}={getattr(cfg.data, length_key)} is not divisible by mesh.context="
                        f"{context_size(mesh)}: each row's positions are split between that many devices")
    if cfg.data.batch_size % k:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is not divisible by optim.grad_accum_steps={k}")
    model_cfg = model_cfg or model_config(cfg)
    return SFTTrainer(Decoder(model_cfg), make_optimizer(cfg.optim, cfg.steps), mesh=mesh, grad_accum_steps=k,
                      loss_chunk_size=loss_chunk(model_cfg, cfg.loss.chunk_size), z_loss=cfg.loss.z_loss, seed=cfg.seed)


def check_run_dir(run_dir: str | Path) -> epath.Path:
    """The run directory, checked for writing without creating anything: a failed start leaves no empty or
    half-written directory behind (`create_run_dir` makes it once every check has passed)."""
    path = paths.path(run_dir, "run_dir")
    try:
        if paths.is_remote(path):  # a bucket has no permissions to read: one probe object per process
            paths.require_gcs_credentials(str(run_dir), "run_dir")
            probe = path / f".write-test-{jax.process_index()}-{os.getpid()}"
            paths.bounded(lambda: (probe.write_text(""), probe.unlink()), str(run_dir), "run_dir")
            return path
        existing = Path(path).absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"run_dir={str(run_dir)!r} cannot be written: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"run_dir={str(run_dir)!r} cannot be written: {existing} is not writable by this user")
    except OSError as err:
        raise UserError(f"run_dir={str(run_dir)!r} cannot be written: {err.strerror or err}") from None
    return path


def create_run_dir(path: epath.Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"run_dir={str(path)!r} cannot be created: {err.strerror or err}") from None


def check_data(cfg: TrainConfig, tokenizer, model_cfg: DecoderConfig | None) -> report.DataReport:
    """The start-of-training data report; refuses data that leaves nothing to train on."""
    if model_cfg is not None and model_cfg.vocab_size < tokenizer.vocab_size:
        where = f"model.path={cfg.model.path!r}" if cfg.model.path else f"model.preset={cfg.model.preset!r}"
        raise UserError(f"{where} has vocab_size {model_cfg.vocab_size}, smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} (tokenizer.path={tokenizer_path(cfg)!r})")
    counts, items = scan(cfg.data, tokenizer, cfg.seed)
    data_report = report.build(cfg.data, counts, items)
    if counts["kept"] == 0:
        raise UserError(
            f"data.path: none of the {counts['scanned']:,} records scanned can be trained on: "
            f"{counts['too_long']:,} longer than data.max_length={cfg.data.max_length} with "
            f"data.truncation={cfg.data.truncation!r}, {counts['no_target']:,} with no trained token, "
            f"{counts['template']:,} refused by the chat template"
            + "".join(f"; {n:,} {cause}" for cause, (n, _) in data_report.refusals.items()))
    if cfg.data.eval_path is not None:  # read to its end now: a broken line would otherwise stop the run at its
        held_out, _ = scan(cfg.data, tokenizer, cfg.seed, limit=None, split="eval")  # first evaluation
        if held_out["kept"] == 0:
            raise UserError(f"data.eval_path: none of the {held_out['scanned']:,} held-out records can be evaluated "
                            f"({held_out['too_long']:,} too long, {held_out['no_target']:,} with no trained token, "
                            f"{held_out['template']:,} refused by the chat template)")
    return data_report


def restore_or_init(trainer: SFTTrainer, cfg: TrainConfig, tokenizer, ckpt: Checkpointer, say: Say):
    """(state, this process's batch iterator, resumed step): from the newest usable checkpoint, state and
    data position together, else a fresh state and the data from the start."""
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    restored = ckpt.restore_latest(abstract_state(trainer, cfg).replace(frozen=None))
    if restored is None:
        return init_state(trainer, cfg), make_iterator(cfg.data, tokenizer, seed=cfg.seed, **shard), 0
    state, saved, step = restored
    saved_base = ckpt.saved_config(step).get("base")
    if trainer.lora is not None and saved_base is not None and saved_base != base_fingerprint(cfg):
        raise UserError(f"{ckpt.directory}/{step} trained LoRA adapters on the base {saved_base}, but this run's "
                        f"base is {base_fingerprint(cfg)}; use the same model.path (or preset and seed)")
    state = with_frozen_base(trainer, cfg, state)
    batches, note = resume_iterator(cfg.data, tokenizer, saved, seed=cfg.seed, step=step, **shard)
    if note:
        say(f"warning: {note}")
    say(f"resumed from {ckpt.directory}/{step}")
    return state, batches, step


def eval_sources(data: DataConfig) -> dict[str, DataConfig]:
    """Each held-out source's data config by name: with several `data.eval_path` entries, one per entry
    (named by its file stem), so the log has the loss and accuracy of each; else the whole set."""
    files = data.eval_path
    if not isinstance(files, list) or len(files) < 2:
        return {"all": data}
    stems = [Path(p).stem for p in files]
    names = stems if len(set(stems)) == len(stems) else [str(p) for p in files]
    return {name: dataclasses.replace(data, eval_path=p) for name, p in zip(names, files)}


def generation_eval(trainer: SFTTrainer, cfg: TrainConfig, tokenizer, state: TrainState, run_dir: epath.Path,
                    step: int) -> tuple[dict, str]:
    """Greedy generation over the first `eval.num_generate` held-out records: (the exact match for the log,
    a line for the user), and each prompt (as the model saw it) with its reference and generation in
    `eval/step_N.jsonl`, which process 0 writes."""
    from sft_sharded.generate import exact_match

    records = open_records(cfg.data, "eval", cfg.seed)  # opened once (a JSONL source indexes its file)
    held_out = [records[i][0] for i in range(min(len(records), cfg.eval.num_generate))]
    params = partition.merge(state.params, state.frozen)
    accuracy, scored = exact_match(trainer, params, held_out, tokenizer, cfg.eval.max_new_tokens)
    if jax.process_index() == 0:
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        (run_dir / "eval" / f"step_{step}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
    wrong = [(r["reference"], r["generation"]) for r in scored if r["reference"] != r["generation"]][:1]
    line = (f"step {step}: held-out exact match (greedy generation): {accuracy:.2%} of {len(scored)}"
            + (f"; e.g. expected {wrong[0][0]!r}, got {wrong[0][1]!r}" if wrong else ""))
    return {"eval_exact_match": accuracy, "eval_generated": len(scored)}, line


@dataclasses.dataclass
class Prepared:
    """A run after its checks, restored or initialised: what `train` drives. It holds the run directory's
    lock until `close`."""

    cfg: TrainConfig
    run_dir: epath.Path
    trainer: SFTTrainer
    tokenizer: Any
    state: TrainState
    batches: Any  # this process's BatchIterator
    resumed_step: int
    ckpt: Checkpointer
    lock: RunLock | None  # process 0 only

    @property
    def has_eval(self) -> bool:
        return self.cfg.data.path is None or self.cfg.data.eval_path is not None

    def close(self) -> None:
        try:
            self.ckpt.close()  # raises when the last async save failed; the lock is released all the same
        finally:
            if self.lock is not None:
                self.lock.release()


def prepare(cfg: TrainConfig, say: Say = print) -> Prepared:
    """Every check of the user's input (run dir and its lock, model, tokenizer, data, mesh, trackers,
    checkpoints) before any compile; only then the run directory is created and locked, and the state and
    data position restored or initialised; config.yaml is written last."""
    first = jax.process_index() == 0
    run_dir = check_run_dir(cfg.run_dir)
    if first:
        check_free(run_dir)  # at once: the checks below read the whole held-out set
    model_cfg = model_config(cfg)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    for line in check_data(cfg, tokenizer, model_cfg).lines():
        say(line)
    trainer = build_trainer(cfg, model_cfg)
    if first:
        for line in check_trackers(cfg):
            say(line)
    mesh = trainer.mesh
    note = lora_off_note(cfg)
    if note:
        say(note)
    adapters = model_cfg.num_adapter_params()
    size = (f"{model_cfg.num_params() / 1e6:.2f}M frozen params + {adapters / 1e6:.2f}M trained LoRA params"
            if adapters else f"{model_cfg.num_params() / 1e6:.2f}M params")
    say(f"model: {size} on {len(mesh.devices.flat)} "
        f"{jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}; {cfg.steps} steps of "
        f"{cfg.data.batch_size}x{cfg.data.max_length} tokens; run dir {run_dir}")
    create_run_dir(run_dir)
    lock = RunLock(run_dir, warn=say).acquire() if first else None
    c = cfg.checkpoint
    try:
        ckpt = Checkpointer(run_dir / "checkpoints", every=c.every, keep=c.keep, keep_every=c.keep_every,
                            async_save=c.async_save, warn=say)
        try:
            state, batches, resumed_step = restore_or_init(trainer, cfg, tokenizer, ckpt, say)
        except BaseException:
            ckpt.close()
            raise
        dump_config(cfg, run_dir / "config.yaml")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Prepared(cfg, run_dir, trainer, tokenizer, state, batches, resumed_step, ckpt, lock)


def _fit(run: Prepared, writer, say: Say, on_record, stop_requested) -> tuple[TrainState, list[dict], bool]:
    """The loop with checkpoints, preemption and evaluation; (state, records, stopped early)."""
    from sft_sharded.metrics import flops_per_token
    from sft_sharded.trainers.loop import evaluate_sources, fit

    cfg, ckpt, trainer = run.cfg, run.ckpt, run.trainer
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    eval_fn = None
    if run.has_eval:
        sources = eval_sources(cfg.data)

        def eval_fn(state):
            out = evaluate_sources(trainer, state, {
                name: make_iterator(data, run.tokenizer, split="eval", seed=cfg.seed, **shard)
                for name, data in sources.items()})
            step = int(state.step)
            if cfg.eval.num_generate and (cfg.eval.generate == "each_eval" or step == cfg.steps):
                generated, line = generation_eval(trainer, cfg, run.tokenizer, state, run.run_dir, step)
                say(line)
                out.update(generated)
            return out

    config_dict, stopped = {**to_dict(cfg), "base": base_fingerprint(cfg)}, []

    def save_due(step: int) -> bool:
        reason = stop_requested(step)
        if reason and not stopped:
            stopped.append(reason)
        return bool(stopped) or ckpt.due(step)

    def after_step(step: int, state) -> bool:
        # a LoRA run's checkpoint holds what training changes; the frozen base is read again on resume
        t0 = time.perf_counter()
        saved = ckpt.save(step, state.replace(frozen=None), run.batches.get_state(), config_dict, force=bool(stopped))
        if saved and not stopped:
            say(f"step {step}: checkpoint {ckpt.directory}/{step} (training waited {time.perf_counter() - t0:.2f}s"
                + ("; written in the background)" if cfg.checkpoint.async_save else ")"))
        if stopped:
            ckpt.wait()
            say(f"{stopped[0]}: saved {ckpt.directory}/{step}; the same command resumes from it")
        return bool(stopped)

    def check_memory(state, batch) -> None:  # the compiled step is the one the first call then runs
        compiled = trainer.lower("train", state, batch).compile()
        local = jax.local_devices()
        line = check_fits(compiled, local, advice(cfg, len(local), local[0].platform))
        if line:
            say(line)

    def record(r: dict) -> None:
        if "loss" in r:
            r["packing_efficiency"] = run.batches.efficiency
        writer.write(r)
        on_record(r)

    try:
        state, records = fit(trainer, run.state, run.batches, steps=cfg.steps, log_every=cfg.log_every,
                             eval_every=cfg.eval.every, eval_fn=eval_fn, on_record=record, after_step=after_step,
                             save_due=save_due, before_first_step=check_memory,
                             flops_per_token=flops_per_token(trainer.model.config, cfg.data.max_length))
    except TrainingDiverged as err:
        ckpt.wait()  # the saves of earlier (good) steps complete
        steps = ckpt.all_steps()
        where = (f"the newest checkpoint, {ckpt.directory}/{steps[-1]}, holds the last good state" if steps
                 else "no checkpoint was saved")
        err.args = (f"{err.args[0]}; {where}",)
        raise
    return state, records, bool(stopped)


def train(cfg: TrainConfig, *, say: Say = print, on_record: Callable[[dict], None] = lambda r: None,
          stop_requested: Callable[[int], str | None] = lambda step: None) -> list[dict]:
    """Train `cfg` to `cfg.steps` (resuming from the run directory's checkpoints), then evaluate and save
    the final params. `on_record` sees every metrics record; `stop_requested(step)` returning a reason
    ("preempted", "interrupted") makes the loop save and return at that step."""
    from sft_sharded.metrics import MetricsWriter

    run = prepare(cfg, say)
    try:
        first = jax.process_index() == 0
        writer = MetricsWriter(run.run_dir, enabled=first, resumed_step=run.resumed_step)
        t0 = time.perf_counter()
        try:
            if first:
                writer.trackers = make_trackers(cfg, run.run_dir, writer.local_dir)
            state, records, stopped = _fit(run, writer, say, on_record, stop_requested)
            if stopped:
                return records
            ran = cfg.steps - run.resumed_step  # this process's steps, not the run's
            say(f"trained {ran} steps ({run.resumed_step + 1}-{cfg.steps}) in {time.perf_counter() - t0:.1f}s; "
                f"packing efficiency {run.batches.efficiency:.1%}")
        finally:
            writer.close()
        save_params(run.run_dir, state.params)
        return records
    finally:
        run.close()


def _load_run(run_dir: str | Path) -> tuple[TrainConfig, SFTTrainer, Any]:
    """The config, a trainer and the params of a run: its final params, else its newest checkpoint's."""
    path = paths.path(run_dir, "run_dir")
    if not (path / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(path / "config.yaml")
    trainer = build_trainer(cfg)
    abstract = abstract_state(trainer, cfg)
    if (path / FINAL_PARAMS).is_dir():
        return cfg, trainer, load_params(path, abstract.params)
    restored = Checkpointer(path / "checkpoints", every=0, keep=1).restore_latest(abstract.replace(frozen=None))
    if restored is None:
        raise UserError(f"{run_dir}: no {FINAL_PARAMS}/ and no checkpoint (train the run first)")
    return cfg, trainer, restored[0].params


def _model_params(trainer: SFTTrainer, cfg: TrainConfig, params: Any, base_dtype=None) -> Any:
    """The model's full params from what a run saved (with LoRA: its adapters on the frozen base, here
    in `base_dtype` if given, merged into the weights when `base_dtype` is set)."""
    if trainer.lora is None:
        return params
    if base_dtype is None:
        return partition.merge(params, frozen_base(trainer, cfg))
    from sft_sharded.peft import merge

    return merge(base_weights(trainer, cfg, base_dtype), params, trainer.model.config)


def export(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32", to: str = "hf") -> Path:
    """A run's final params (else its newest checkpoint's) as a Hugging Face directory, with the token ids
    and generation config of the checkpoint it was fine-tuned from (for a preset: of its tokenizer).
    `to="peft"` writes a LoRA run's adapters as a PEFT adapter; `to="hf"` merges them into the base,
    whose weights are read again from `model.path` in float32 (never from the stored base copy)."""
    cfg, trainer, params = _load_run(run_dir)
    if to == "peft":
        from sft_sharded.peft import save_adapter

        if trainer.lora is None:
            raise UserError(f"{run_dir}: export --to peft needs a LoRA run (lora.rank > 0)")
        return save_adapter(params, trainer.model.config, out_dir, cfg.model.path or f"preset:{cfg.model.preset}")
    params = _model_params(trainer, cfg, params, jnp.float32)
    tok_path = tokenizer_path(cfg)
    if cfg.model.path:
        source = hf.read_hf_config(cfg.model.path)
        token_ids = {k: source[k] for k in hf.TOKEN_ID_FIELDS if k in source}
        gen_path = paths.path(cfg.model.path, "model.path") / "generation_config.json"
        generation = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        model_type = source["model_type"]
    else:
        token_ids, generation, model_type = hf.tokenizer_token_ids(load_tokenizer(tok_path)), None, None
    return hf.save_pretrained(params, trainer.model.config, out_dir, model_type=model_type, dtype=dtype,
                              tokenizer_dir=tok_path, token_ids=token_ids, generation_config=generation)


def generate(run_dir: str | Path, prompts: list[str], max_new_tokens: int, raw: bool = False) -> list[str]:
    """Greedy answers of a trained run to user messages (or raw text prompts with `raw`)."""
    from sft_sharded.generate import greedy_generate, prompt_and_answer

    cfg, trainer, params = _load_run(run_dir)
    params = _model_params(trainer, cfg, params)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    records = [{"prompt": p, "completion": ""} if raw else
               {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]} for p in prompts]
    ids = [prompt_and_answer(r, tokenizer)[0] for r in records]
    outs = greedy_generate(trainer, params, ids, max_new_tokens, tokenizer.stop_ids)
    return [tokenizer.decode(o) for o in outs]
