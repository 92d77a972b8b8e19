"""Held-out evaluation of a run: loss and token accuracy per held-out source, and greedy generation scored
by exact match (written to `eval/step_N.jsonl`). `make_eval_fn` is what the training loop calls."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
from etils import epath

from sft_sharded.config import DataConfig, TrainConfig
from sft_sharded.data.pipeline import make_iterator, open_records
from sft_sharded.trainers import SFTTrainer, TrainState, partition
from sft_sharded.trainers.loop import evaluate_sources
from sft_sharded.generate import exact_match


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


def make_eval_fn(trainer: SFTTrainer, cfg: TrainConfig, tokenizer, run_dir: epath.Path,
                 say: Callable[[str], None]) -> Callable[[TrainState], dict]:
    """The loop's evaluation: every held-out source's loss and accuracy, plus greedy generation on each
    evaluation (`eval.generate=each_eval`) or the last, when `eval.num_generate` asks for any."""
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    sources = eval_sources(cfg.data)

    def eval_fn(state: TrainState) -> dict:
        out = evaluate_sources(trainer, state, {
            name: make_iterator(data, tokenizer, split="eval", seed=cfg.seed, **shard)
            for name, data in sources.items()})
        step = int(state.step)
        if cfg.eval.num_generate and (cfg.eval.generate == "each_eval" or step == cfg.steps):
            generated, line = generation_eval(trainer, cfg, tokenizer, state, run_dir, step)
            say(line)
            out.update(generated)
        return out

    return eval_fn
