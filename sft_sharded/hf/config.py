"""Hugging Face `config.json` <-> DecoderConfig, field by field.

Each supported `model_type` has an explicit list of the fields its transformers model reads. Every such
field is either implemented or refused with its name and value; fields that only describe the checkpoint
(token ids, `max_position_embeddings`, generation defaults) are carried through to an export; fields that
change nothing in the forward pass are listed as harmless. Any other field is reported: transformers'
model for that type does not read it either, so it cannot change the math, but it may be a sign that the
file belongs to another architecture.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from sft_sharded.rundir import paths
from sft_sharded.errors import MissingFileError, UserError
from sft_sharded.families import FAMILIES, MULTIMODAL, Family, HfFields, Multimodal
from sft_sharded.families.base import rope_scaling_to_hf
from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.rope import check_scaling

# Token ids describe the checkpoint (and its tokenizer), not the math: carried to the export as they are.
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Bookkeeping every PretrainedConfig may hold; none of it reaches the forward pass.
HARMLESS_FIELDS = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "torchscript", "pruned_heads", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "cross_attention_hidden_size",
    # transformers 5 writes Gemma 3's pattern under this private name next to the layer_types it derived.
    "_sliding_window_pattern",
    # Llama-2's tensor-parallel slicing of its matmuls: the same products, summed in another order.
    "pretraining_tp",
    # Generation defaults that older transformers kept in config.json (generation_config.json now).
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
}


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = paths.path(directory, "model.path") / "config.json"
    if not path.is_file():
        raise MissingFileError(f"model.path={str(directory)!r}: no config.json in that directory")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err.msg} (line {err.lineno})") from None
    if hf.get("model_type") not in FAMILIES and hf.get("model_type") not in MULTIMODAL:
        raise UserError(f"{path}: model_type {hf.get('model_type')!r} is not supported "
                        f"(supported: {sorted(FAMILIES)}; multimodal, text only: {sorted(MULTIMODAL)})")
    if hf["model_type"] in MULTIMODAL:
        if not isinstance(hf.get("text_config"), dict):
            raise UserError(f"{path}: model_type {hf['model_type']!r} needs a text_config (its language model)")
        allowed = MULTIMODAL[hf["model_type"]].text_model_types
        if hf["text_config"].get("model_type", allowed[0]) not in allowed:
            raise UserError(f"{path}: text_config.model_type={hf['text_config']['model_type']!r} is not supported "
                            f"inside {hf['model_type']!r} (supported: {list(allowed)})")
    return hf


def text_part(hf: dict[str, Any]) -> dict[str, Any]:
    """The language model's config.json: the file itself, or a multimodal checkpoint's text_config."""
    if hf["model_type"] not in MULTIMODAL:
        return hf
    multimodal = MULTIMODAL[hf["model_type"]]
    text = {k: v for k, v in hf["text_config"].items() if k not in multimodal.ignored_text_fields}
    # The multimodal class ties its head by its own flag (transformers' default: tied), not text_config's.
    return {**text, "model_type": text.get("model_type", multimodal.text_model_types[0]),
            "tie_word_embeddings": hf.get("tie_word_embeddings", multimodal.tie_default)}


def _scaling(f: HfFields, field: str, scaling: dict | None) -> tuple | None:
    """A rope scaling dict as DecoderConfig.rope_scaling (None: plain RoPE), or refused by name."""
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    s = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    s["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    if s["rope_type"] == "dynamic":
        raise f.refuse(field, scaling, "dynamic NTK scaling changes the frequencies with the batch's length, "
                      "so training would not match the model transformers runs; use yarn or linear")
    if s["rope_type"] in ("yarn", "llama3"):
        s.setdefault("original_max_position_embeddings", f.get("max_position_embeddings"))
    if s["rope_type"] == "yarn" and s.get("factor") is None and s["original_max_position_embeddings"]:
        s["factor"] = f["max_position_embeddings"] / s["original_max_position_embeddings"]
    try:
        return check_scaling(s)
    except ValueError as err:
        raise f.refuse(field, scaling, str(err)) from None


def _rope(f: HfFields, family: Family) -> dict[str, Any]:
    """rope_theta, rope_scaling and (Gemma 3) rope_local_theta. transformers >= 5 writes `rope_parameters`
    (per layer type for Gemma 3); older configs use `rope_theta`, `rope_scaling`, `rope_local_base_freq`."""
    def scaling_only(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in family.rope_extras}

    params = scaling_only(f.get("rope_parameters") or {})
    full, local = params, None
    if "full_attention" in params or "sliding_attention" in params:
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    elif params and family.local_rope:
        raise f.refuse("rope_parameters", params, f"model_type {family.model_type!r} takes RoPE per layer type "
                       "({'full_attention': {...}, 'sliding_attention': {...}}); transformers ignores a flat one "
                       "and gives every layer plain RoPE with its default base")
    theta = float(full.get("rope_theta", f.get("rope_theta", 10_000.0)))
    field = "rope_scaling" if f.get("rope_scaling") else "rope_parameters"
    out = {"rope_theta": theta, "rope_scaling": _scaling(f, field, scaling_only(f.get("rope_scaling") or full)),
           **_partial_rotary(f, family, full)}
    if family.local_rope:
        local = local or {}
        if _scaling(f, "rope_parameters.sliding_attention", local) is not None:
            raise f.refuse("rope_parameters.sliding_attention", local, "only plain RoPE on sliding layers")
        out["rope_local_theta"] = float(local.get("rope_theta", f.get("rope_local_base_freq", theta)))
    return out


def _partial_rotary(f: HfFields, family: Family, full: dict) -> dict[str, Any]:
    """rotary_dim from partial_rotary_factor (in rope_parameters, or at the top as older configs have it),
    as transformers rounds it: int(head_dim * factor)."""
    if full.get("rope_type") == "proportional":
        return {}  # Gemma 4: the factor is the proportional scaling's own (models/rope.py)
    where = "rope_parameters.partial_rotary_factor" if "partial_rotary_factor" in full else "partial_rotary_factor"
    factor = full.get("partial_rotary_factor", f.get("partial_rotary_factor", 1.0))
    if factor == 1.0:
        return {}
    if "partial_rotary_factor" not in family.reads:
        raise f.refuse(where, factor, f"model_type {family.model_type!r} rotates every dimension of a head")
    if not 0 < factor <= 1:
        raise f.refuse(where, factor, "it must be in (0, 1]")
    head_dim = f.get("head_dim") or f["hidden_size"] // f["num_attention_heads"]
    return {"rotary_dim": int(head_dim * factor)}


def config_from_hf(directory: str | Path, **overrides) -> DecoderConfig:
    """DecoderConfig of a Hugging Face directory; refuses any field value the model does not implement."""
    full = read_hf_config(directory)
    hf = text_part(full)
    path = paths.path(directory, "model.path") / "config.json"
    if hf is not full:  # errors name the field where it is
        path = f"{path}: text_config"
    family = FAMILIES[hf["model_type"]]
    f = HfFields(path, hf, family.defaults)
    unknown = sorted(set(hf) - family.reads - HARMLESS_FIELDS - set(TOKEN_ID_FIELDS))
    quantization = hf.get("quantization_config")
    if quantization is not None and (quantization or {}).get("quant_method") in family.quantizations:
        unknown.remove("quantization_config")  # read by hf.Source: the weights are dequantized on import
    elif "quantization_config" in unknown:
        raise f.refuse("quantization_config", quantization, "quantized checkpoints are not read (except "
                       "gpt-oss's MXFP4 experts); use a float16/bfloat16/float32 checkpoint")
    if unknown:
        warnings.warn(f"{path}: fields {unknown} are not read by model_type {family.model_type!r} (neither here nor "
                      "in transformers' model of that type); check that the checkpoint is what you think it is",
                      stacklevel=2)
    if hf.get("attention_dropout", 0.0):
        raise f.refuse("attention_dropout", hf["attention_dropout"],
                       "dropout is not implemented (set it to 0.0 to train without dropout)")
    try:
        heads = f["num_attention_heads"]
        fields = family.from_hf(f)  # a family without a dense MLP (Qwen3.5-MoE) gives its own mlp_dim
        return DecoderConfig(
            vocab_size=f["vocab_size"], hidden_size=f["hidden_size"], num_layers=f["num_hidden_layers"],
            num_heads=heads, num_kv_heads=f.get("num_key_value_heads") or heads,
            mlp_dim=fields.pop("mlp_dim", None) or f["intermediate_size"],
            head_dim=f.get("head_dim"), rms_norm_eps=float(f.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(f.get("tie_word_embeddings", False)),
            max_position_embeddings=f.get("max_position_embeddings"),
            **fields, **_rope(f, family), **overrides,
        )
    except KeyError as err:
        raise UserError(f"{path}: required field {err.args[0]!r} is missing") from None
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None


def hf_model_type(cfg: DecoderConfig, preferred: str | None = None) -> str:
    """The transformers family that computes exactly this model: `preferred` when it fits."""
    if preferred in FAMILIES and FAMILIES[preferred].fits(cfg):
        return preferred
    for model_type, family in FAMILIES.items():
        if family.fits(cfg):
            return model_type
    fields = {k: getattr(cfg, k) for k in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm", "norm_plus_one",
                                           "activation", "sliding_window", "rope_local_theta")}
    raise UserError(f"no Hugging Face family computes this model ({fields})")


def tokenizer_token_ids(tokenizer) -> dict[str, Any]:
    """bos/eos/pad ids of a tokenizer, for a model trained from a preset. eos lists every stop id (the chat
    template's turn end too), so transformers' `generate` stops where our generation does."""
    stops = list(tokenizer.stop_ids)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
           "pad_token_id": tokenizer.pad_id}
    return {k: v for k, v in ids.items() if v is not None and v != []}


def config_to_hf(cfg: DecoderConfig, model_type: str, dtype: str, token_ids: dict[str, Any] | None = None,
                 source: dict[str, Any] | None = None) -> dict:
    """config.json for `model_type` (which must fit the model: `hf_model_type`), with the checkpoint's
    token ids (bos/eos/pad, as given) and `max_position_embeddings`. `source` is the config.json the model
    was imported from: what it holds that training did not use is written back as it was, and a multimodal
    one is written whole with this model as its text_config."""
    text_source = text_part(source) if source is not None else {}
    if hf_model_type(cfg, model_type) != model_type:
        raise UserError(f"this model cannot be written as model_type {model_type!r}; "
                        f"it can as {hf_model_type(cfg)!r}")
    if cfg.max_position_embeddings is None:
        raise UserError("DecoderConfig.max_position_embeddings is not set: it is written to config.json on export")
    out = {
        "architectures": [FAMILIES[model_type].architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.mlp_dim, "head_dim": cfg.head_size,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "max_position_embeddings": cfg.max_position_embeddings,
        # Every id written (the source's where not given), None where unknown: transformers' family defaults
        # (SmolLM3's pad 128004) would otherwise name tokens this vocabulary may not have.
        "torch_dtype": dtype, **{k: (token_ids or {}).get(k, text_source.get(k)) for k in TOKEN_ID_FIELDS},
        **FAMILIES[model_type].to_hf(cfg),
    }
    # transformers adds the load-balancing loss only with output_router_logits, so a model imported without
    # it trains with none; its coefficient is still the checkpoint's (Mixtral 0.02), not 0.
    if cfg.num_experts and not cfg.router_aux_loss_coef and "router_aux_loss_coef" in text_source:
        out["router_aux_loss_coef"] = text_source["router_aux_loss_coef"]
    out |= {k: text_source[k] for k in FAMILIES[model_type].carried if k in text_source}
    # RoPE parameters the text math does not use (Qwen3.5's multimodal position sections) go back as they were
    source_rope = text_source.get("rope_parameters") or {}
    if isinstance(out.get("rope_parameters"), dict) and "full_attention" not in source_rope:
        out["rope_parameters"] |= {k: source_rope[k] for k in FAMILIES[model_type].rope_extras
                                   if k in source_rope and k not in out["rope_parameters"]}
    if cfg.rope_scaling and "rope_parameters" not in out:  # a family writing rope_parameters says it all there
        out["rope_scaling"] = rope_scaling_to_hf(cfg)
    multimodal = MULTIMODAL.get((source or {}).get("model_type"))
    return out if multimodal is None else _multimodal_to_hf(out, cfg, source, multimodal)


def _multimodal_to_hf(text: dict[str, Any], cfg: DecoderConfig, source: dict[str, Any],
                      multimodal: Multimodal) -> dict:
    """The source's multimodal config.json with `text` as its text_config. Token ids its text_config leaves to
    transformers' defaults stay left out; fields its class ignores are written back as they were."""
    source_text = source["text_config"]
    text = {k: v for k, v in text.items()
            if k != "architectures" and (k not in TOKEN_ID_FIELDS or k in source_text)}
    text |= {k: source_text[k] for k in multimodal.ignored_text_fields if k in source_text}
    return {**source, "architectures": [multimodal.architecture], "text_config": text,
            "tie_word_embeddings": cfg.tie_embeddings}
