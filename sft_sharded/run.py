"""A run assembled from a TrainConfig: the composition root that the CLI, benchmarks and tests share.

`build_trainer` (mesh, model, optimizer), `abstract_state` (shapes and shardings, nothing allocated),
`init_state` (fresh or from a Hugging Face directory), `restore_or_init` (state and data iterator
together), `train` (the loop with checkpoints and the final evaluation; the evaluation itself is in
`evaluation.py`, what is done with a trained run directory in `rundir/trained.py`). Every check of the user's
input runs before the first compile and before anything in the run directory is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from etils import epath

from sft_sharded.rundir import paths
from sft_sharded.hf import weights as hf
from sft_sharded.rundir.checkpoint import Checkpointer, save_params
from sft_sharded.config import TrainConfig, dump_config, to_dict
from sft_sharded.data import report
from sft_sharded.data.pipeline import make_iterator, resume_iterator, scan
from sft_sharded.data.tokenizers import load_tokenizer
from sft_sharded.errors import TrainingDiverged, UserError
from sft_sharded.rundir.lock import RunLock, check_free
from sft_sharded.evaluation import make_eval_fn
from sft_sharded.parallel.distributed import on_first_process
from sft_sharded.parallel.memory import check_first_step
from sft_sharded.models import Decoder, DecoderConfig, preset
from sft_sharded.models.presets import loss_chunk
from sft_sharded.optim import make_optimizer
from sft_sharded.parallel.sharding import context_size, data_parallel_size, make_mesh
from sft_sharded.state import abstract_state, base_fingerprint, init_state, with_frozen_base
from sft_sharded.rundir.tracking import check_trackers, make_trackers
from sft_sharded.trainers import SFTTrainer, TrainState
from sft_sharded.trainers.loop import fit
from sft_sharded.metrics import MetricsWriter, flops_per_token

Say = Callable[[str], None]


def model_config(cfg: TrainConfig) -> DecoderConfig:
    """The preset, or the config.json of `model.path`, with the run's options: every `model.*` key but those
    two is a DecoderConfig field of the same name, and `lora` is the model's LoRA."""
    m = cfg.model
    options = {**{k: v for k, v in dataclasses.asdict(m).items() if k not in ("preset", "path")}, "lora": cfg.lora}
    try:
        return hf.config_from_hf(m.path, **options) if m.path else preset(m.preset, **options)
    except UserError:
        raise
    except (ValueError, TypeError) as err:  # DecoderConfig's own checks of the model.* options
        raise UserError(f"model: {err}") from None


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


def build_trainer(cfg: TrainConfig, model_cfg: DecoderConfig | None = None, mesh: Mesh | None = None) -> SFTTrainer:
    """Mesh (cfg.mesh over this process's devices unless given: `plan` gives a TPU topology's), model and
    optimizer of a config; checks that the global batch splits over the mesh."""
    if mesh is None:
        mesh = make_mesh(**dataclasses.asdict(cfg.mesh))  # the axes' sizes and the slice layout
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


def remote_inputs(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(config key, path) of every bucket path the run reads: each gets a bounded first access at start-up."""
    named = [("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path), ("model.path", cfg.model.path),
             ("tokenizer.path", cfg.tokenizer.path), ("lora.init_from", cfg.lora.init_from)]
    return [(key, value) for key, values in named for value in ([values] if isinstance(values, str) else values or [])
            if paths.is_remote(value)]


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
        held_out, _ = scan(cfg.data, tokenizer, cfg.seed, split="eval", whole=True)  # first evaluation
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
    saved_config = ckpt.saved_config(step)
    saved_base = saved_config.get("base")
    if trainer.lora is not None and saved_base is not None and saved_base != base_fingerprint(cfg):
        raise UserError(f"{ckpt.directory}/{step} trained LoRA adapters on the base {saved_base}, but this run's "
                        f"base is {base_fingerprint(cfg)}; use the same model.path (or preset and seed)")
    state = with_frozen_base(trainer, cfg, state)
    batches, note = resume_iterator(cfg.data, tokenizer, saved, seed=cfg.seed, step=step, **shard,
                                    saved_worker_count=saved_config.get("data", {}).get("worker_count"))
    if note:
        say(f"warning: {note}")
    say(f"resumed from {ckpt.directory}/{step}")
    return state, batches, step


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
    run_dir = check_run_dir(cfg.run_dir)
    on_first_process(lambda: check_free(run_dir))  # at once: the checks below read the whole held-out set
    for key, value in remote_inputs(cfg):
        paths.reach(value, key)
    model_cfg = model_config(cfg)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    for line in check_data(cfg, tokenizer, model_cfg).lines():
        say(line)
    trainer = build_trainer(cfg, model_cfg)
    for line in on_first_process(lambda: check_trackers(cfg)) or []:
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
    with contextlib.ExitStack() as undo:  # on an error: close what was opened, release the lock
        lock = on_first_process(RunLock(run_dir, warn=say).acquire)
        if lock is not None:
            undo.callback(lock.release)
        c = cfg.checkpoint
        ckpt = Checkpointer(run_dir / "checkpoints", every=c.every, keep=c.keep, keep_every=c.keep_every,
                            async_save=c.async_save, warn=say)
        undo.callback(ckpt.close)
        state, batches, resumed_step = restore_or_init(trainer, cfg, tokenizer, ckpt, say)
        dump_config(cfg, run_dir / "config.yaml")
        undo.pop_all()  # all went well: the Prepared run holds them now
    return Prepared(cfg, run_dir, trainer, tokenizer, state, batches, resumed_step, ckpt, lock)


def _fit(run: Prepared, writer, say: Say, on_record, stop_requested) -> tuple[TrainState, list[dict], bool]:
    """The loop with checkpoints, preemption and evaluation; (state, records, stopped early)."""
    cfg, ckpt, trainer = run.cfg, run.ckpt, run.trainer
    eval_fn = make_eval_fn(trainer, cfg, run.tokenizer, run.run_dir, say) if run.has_eval else None
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

    def check_memory(state, batch) -> None:
        line = check_first_step(trainer, cfg, state, batch)
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
