"""A trained run directory put to use, without its optimizer state: `export` (a Hugging Face directory, or
a LoRA run's PEFT adapter) and `generate` (greedy answers). The params are the run's final params, else
its newest checkpoint's; a LoRA run's frozen base is read again from where the run took it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sft_sharded.rundir import paths
from sft_sharded.hf import weights as hf
from sft_sharded.rundir.checkpoint import FINAL_PARAMS, Checkpointer, load_params
from sft_sharded.config import TrainConfig, load_config
from sft_sharded.data.tokenizers import load_tokenizer
from sft_sharded.errors import UserError
from sft_sharded.families import FAMILIES, MULTIMODAL
from sft_sharded.run import build_trainer, tokenizer_path
from sft_sharded.state import abstract_state, base_weights, frozen_base
from sft_sharded.trainers import SFTTrainer, partition
from sft_sharded.hf.peft import merge, save_adapter
from sft_sharded.generate import greedy_generate, prompt_and_answer


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

    return merge(base_weights(trainer, cfg, base_dtype), params, trainer.model.config)


def export(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32", to: str = "hf") -> Path:
    """A run's final params (else its newest checkpoint's) as a Hugging Face directory, with the token ids
    and generation config of the checkpoint it was fine-tuned from (for a preset: of its tokenizer).
    `to="peft"` writes a LoRA run's adapters as a PEFT adapter; `to="hf"` merges them into the base,
    whose weights are read again from `model.path` in float32 (never from the stored base copy)."""
    cfg, trainer, params = _load_run(run_dir)
    if to == "peft":
        if trainer.lora is None:
            raise UserError(f"{run_dir}: export --to peft needs a LoRA run (lora.rank > 0)")
        source = hf.read_hf_config(cfg.model.path) if cfg.model.path else None
        if source and (source["model_type"] in MULTIMODAL or FAMILIES[source["model_type"]].fused):
            # PEFT adapts a fused tensor (Phi-3's qkv_proj) as one module, with one A for q, k and v; a
            # multimodal base names its layers under its language model.
            raise UserError(f"{run_dir}: export --to peft is not implemented for model_type "
                            f"{source['model_type']!r} (fused projections or a multimodal checkpoint); "
                            "export --to hf writes the merged model")
        return save_adapter(params, trainer.model.config, out_dir, cfg.model.path or f"preset:{cfg.model.preset}")
    params = _model_params(trainer, cfg, params, jnp.float32)
    tok_path = tokenizer_path(cfg)
    if cfg.model.path:
        source = hf.text_part(hf.read_hf_config(cfg.model.path))
        token_ids = {k: source[k] for k in hf.TOKEN_ID_FIELDS if k in source}
        gen_path = paths.path(cfg.model.path, "model.path") / "generation_config.json"
        generation = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        model_type = source["model_type"]
    else:
        token_ids, generation, model_type = hf.tokenizer_token_ids(load_tokenizer(tok_path)), None, None
    return hf.save_pretrained(params, trainer.model.config, out_dir, model_type=model_type, dtype=dtype,
                              tokenizer_dir=tok_path, token_ids=token_ids, generation_config=generation,
                              source_dir=cfg.model.path or None)


def generate(run_dir: str | Path, prompts: list[str], max_new_tokens: int, raw: bool = False) -> list[str]:
    """Greedy answers of a trained run to user messages (or raw text prompts with `raw`)."""
    cfg, trainer, params = _load_run(run_dir)
    params = _model_params(trainer, cfg, params)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    records = [{"prompt": p, "completion": ""} if raw else
               {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]} for p in prompts]
    ids = [prompt_and_answer(r, tokenizer)[0] for r in records]
    outs = greedy_generate(trainer, params, ids, max_new_tokens, tokenizer.stop_ids)
    return [tokenizer.decode(o) for o in outs]
