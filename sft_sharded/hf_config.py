"""Hugging Face `config.json` <-> LlamaConfig, field by field.

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

from sft_sharded.errors import MissingFileError, UserError
from sft_sharded.models.llama import LlamaConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

# Read by the transformers model of every supported type (modeling_llama/qwen2/mistral.py).
_COMMON = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_dropout", "max_position_embeddings",
}
READ_FIELDS = {
    "llama": _COMMON | {"attention_bias", "mlp_bias"},
    "qwen2": _COMMON | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "use_mrope"},
    "mistral": _COMMON | {"sliding_window"},
}
# Token ids describe the checkpoint (and its tokenizer), not the math: carried to the export as they are.
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Bookkeeping every PretrainedConfig may hold; none of it reaches the forward pass.
HARMLESS_FIELDS = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "torchscript", "pruned_heads", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "cross_attention_hidden_size",
    # Llama-2's tensor-parallel slicing of its matmuls: the same products, summed in another order.
    "pretraining_tp",
    # Generation defaults that older transformers kept in config.json (generation_config.json now).
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
}
_ACTIVATIONS = ("silu", "swish")  # transformers maps both to SiLU
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"model.path={str(directory)!r}: no config.json in that directory")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err.msg} (line {err.lineno})") from None
    if hf.get("model_type") not in ARCHITECTURES:
        raise UserError(f"{path}: model_type {hf.get('model_type')!r} is not supported "
                        f"(supported: {sorted(ARCHITECTURES)})")
    return hf


def _refuse(path: Path, field: str, value: Any, why: str) -> UserError:
    return UserError(f"{path}: {field}={json.dumps(value)} is not supported: {why}")


def _rope(path: Path, hf: dict) -> tuple[float, tuple[tuple[str, float], ...] | None]:
    # transformers >= 5 writes "rope_parameters" (theta and scaling together); older configs use
    # top-level "rope_theta" and "rope_scaling".
    rope = hf.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is None:
        return theta, None
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise _refuse(path, field, scaling, f"rope type {kind!r} is not implemented (implemented: llama3)")
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise _refuse(path, field, scaling, f"llama3 scaling needs {missing}")
    return theta, tuple(sorted((k, float(scaling[k])) for k in _LLAMA3_KEYS))


def config_from_hf(directory: str | Path, **overrides) -> LlamaConfig:
    """LlamaConfig of a Hugging Face directory; refuses any field value the model does not implement."""
    hf = read_hf_config(directory)
    path = Path(directory) / "config.json"
    model_type = hf["model_type"]
    unknown = sorted(set(hf) - READ_FIELDS[model_type] - HARMLESS_FIELDS - set(TOKEN_ID_FIELDS))
    if "quantization_config" in unknown:
        raise _refuse(path, "quantization_config", hf["quantization_config"],
                      "quantized checkpoints are not read; use a float16/bfloat16/float32 checkpoint")
    if unknown:
        warnings.warn(f"{path}: fields {unknown} are not read by model_type {model_type!r} (neither here nor in "
                      "transformers' model of that type); check that the checkpoint is what you think it is",
                      stacklevel=2)
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise _refuse(path, "hidden_act", act, f"the MLP is SwiGLU with silu (implemented: {list(_ACTIVATIONS)})")
    if hf.get("attention_dropout", 0.0):
        raise _refuse(path, "attention_dropout", hf["attention_dropout"],
                      "dropout is not implemented (set it to 0.0 to train without dropout)")
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type == "qwen2":
        # Qwen2 windows only some layers (max_window_layers / layer_types): not built (not approximated).
        if hf.get("use_sliding_window"):
            raise _refuse(path, "use_sliding_window", True, "Qwen2's per-layer sliding windows are not implemented")
        if hf.get("use_mrope"):
            raise _refuse(path, "use_mrope", True, "multimodal RoPE (Qwen2-VL) is not implemented")
        sliding = [t for t in hf.get("layer_types") or () if t != "full_attention"]
        if sliding:
            raise _refuse(path, "layer_types", sorted(set(sliding)), "only full_attention layers are implemented")
    theta, scaling = _rope(path, hf)
    heads = hf["num_attention_heads"]
    llama_bias = model_type == "llama" and bool(hf.get("attention_bias", False))
    try:
        return LlamaConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, mlp_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim"), rope_theta=theta, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or llama_bias, o_bias=llama_bias,
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            rope_scaling=scaling, sliding_window=window,
            max_position_embeddings=hf.get("max_position_embeddings"), **overrides,
        )
    except KeyError as err:
        raise UserError(f"{path}: required field {err.args[0]!r} is missing") from None
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None


def hf_model_type(cfg: LlamaConfig, preferred: str | None = None) -> str:
    """The transformers family whose tensors are exactly this model's: `preferred` when it fits."""
    fits = {
        "llama": cfg.qkv_bias == cfg.o_bias and cfg.sliding_window is None,
        "qwen2": cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias and cfg.sliding_window is None,
        "mistral": not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias),
    }
    if preferred is not None and fits.get(preferred):
        return preferred
    for model_type, ok in fits.items():
        if ok:
            return model_type
    raise UserError(f"no Hugging Face family has this model's tensors (qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, "
                    f"mlp_bias={cfg.mlp_bias}, sliding_window={cfg.sliding_window})")


def tokenizer_token_ids(tokenizer) -> dict[str, Any]:
    """bos/eos/pad ids of a tokenizer, for a model trained from a preset. eos lists every stop id (the chat
    template's turn end too), so transformers' `generate` stops where our generation does."""
    stops = list(tokenizer.stop_ids)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
           "pad_token_id": tokenizer.pad_id}
    return {k: v for k, v in ids.items() if v is not None and v != []}


def config_to_hf(cfg: LlamaConfig, model_type: str, dtype: str, token_ids: dict[str, Any] | None = None) -> dict:
    """config.json for `model_type` (which must fit the model: `hf_model_type`), with the checkpoint's
    token ids (bos/eos/pad, as given) and `max_position_embeddings`."""
    if hf_model_type(cfg, model_type) != model_type:
        raise UserError(f"this model cannot be written as model_type {model_type!r}; "
                        f"it can as {hf_model_type(cfg)!r}")
    if cfg.max_position_embeddings is None:
        raise UserError("LlamaConfig.max_position_embeddings is not set: it is written to config.json on export")
    out = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.mlp_dim, "head_dim": cfg.head_size,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "attention_dropout": 0.0, "max_position_embeddings": cfg.max_position_embeddings,
        "torch_dtype": dtype, **{k: v for k, v in (token_ids or {}).items() if k in TOKEN_ID_FIELDS},
    }
    if model_type == "llama":
        out["attention_bias"], out["mlp_bias"] = cfg.o_bias, cfg.mlp_bias
    elif model_type == "qwen2":
        out["use_sliding_window"] = False
    else:
        out["sliding_window"] = cfg.sliding_window
    if cfg.rope_scaling:
        scaling = dict(cfg.rope_scaling)
        # transformers requires an integer here (it warns on 8192.0)
        scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
        out["rope_scaling"] = {"rope_type": "llama3", **scaling}
    return out
