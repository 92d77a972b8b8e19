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

from sft_sharded import paths
from sft_sharded.errors import MissingFileError, UserError
from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.rope import check_scaling

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
}

# Read by the transformers model of every supported type (modeling_<type>.py and its config class).
_COMMON = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "rms_norm_eps", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_dropout", "max_position_embeddings",
}
_QWEN_WINDOWS = {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
_GEMMA = {"hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types", "attention_bias",
          "final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention",
          # Older Gemma configs carry hidden_act beside hidden_activation; transformers reads the latter.
          "hidden_act"}
_ROUTER = {"num_experts_per_tok", "output_router_logits", "router_aux_loss_coef"}
_QWEN_MOE = _ROUTER | {"num_experts", "num_local_experts", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
                       "norm_topk_prob"}
READ_FIELDS = {
    "llama": _COMMON | {"hidden_act", "attention_bias", "mlp_bias"},
    "qwen2": _COMMON | _QWEN_WINDOWS | {"hidden_act", "use_mrope"},
    "qwen3": _COMMON | _QWEN_WINDOWS | {"hidden_act", "attention_bias"},
    "mistral": _COMMON | {"hidden_act", "sliding_window"},
    "gemma2": _COMMON | _GEMMA,
    "gemma3_text": _COMMON | _GEMMA | {"rope_local_base_freq", "sliding_window_pattern"},
    "qwen2_moe": _COMMON | _QWEN_WINDOWS | _QWEN_MOE | {"hidden_act", "qkv_bias", "shared_expert_intermediate_size"},
    "qwen3_moe": _COMMON | _QWEN_WINDOWS | _QWEN_MOE | {"hidden_act", "attention_bias"},
    "mixtral": _COMMON | _ROUTER | {"hidden_act", "sliding_window", "num_local_experts", "router_jitter_noise"},
}
# transformers' defaults for a field a config.json leaves out, where they matter and differ between families.
_GEMMA_DEFAULTS = {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                   "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}
DEFAULTS = {
    "llama": {}, "mistral": {}, "qwen2": {"sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"head_dim": 128, "sliding_window": 4096, "max_window_layers": 28},
    "gemma2": {**_GEMMA_DEFAULTS, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {**_GEMMA_DEFAULTS, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                    "sliding_window_pattern": 6},
    "qwen2_moe": {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "qkv_bias": True,
                  "shared_expert_intermediate_size": 5632, "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1},
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                  "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001},
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
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # transformers' name -> ours


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = paths.path(directory, "model.path") / "config.json"
    if not path.is_file():
        raise MissingFileError(f"model.path={str(directory)!r}: no config.json in that directory")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err.msg} (line {err.lineno})") from None
    if hf.get("model_type") == "gemma3":
        raise UserError(f"{path}: model_type 'gemma3' is the multimodal Gemma 3 (a vision tower beside the "
                        "text decoder), which is not supported; a text-only Gemma 3 has model_type 'gemma3_text'")
    if hf.get("model_type") not in ARCHITECTURES:
        raise UserError(f"{path}: model_type {hf.get('model_type')!r} is not supported "
                        f"(supported: {sorted(ARCHITECTURES)})")
    return hf


def _refuse(path: Path, field: str, value: Any, why: str) -> UserError:
    return UserError(f"{path}: {field}={json.dumps(value)} is not supported: {why}")


def _scaling(path: Path, field: str, scaling: dict | None, hf: dict) -> tuple | None:
    """A rope scaling dict as DecoderConfig.rope_scaling (None: plain RoPE), or refused by name."""
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    s = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    s["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    if s["rope_type"] == "dynamic":
        raise _refuse(path, field, scaling, "dynamic NTK scaling changes the frequencies with the batch's length, "
                      "so training would not match the model transformers runs; use yarn or linear")
    if s["rope_type"] in ("yarn", "llama3"):
        s.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if s["rope_type"] == "yarn" and s.get("factor") is None and s["original_max_position_embeddings"]:
        s["factor"] = hf["max_position_embeddings"] / s["original_max_position_embeddings"]
    try:
        return check_scaling(s)
    except ValueError as err:
        raise _refuse(path, field, scaling, str(err)) from None


def _rope(path: Path, hf: dict, model_type: str) -> dict[str, Any]:
    """rope_theta, rope_scaling and (Gemma 3) rope_local_theta. transformers >= 5 writes `rope_parameters`
    (per layer type for Gemma 3); older configs use `rope_theta`, `rope_scaling`, `rope_local_base_freq`."""
    defaults = DEFAULTS[model_type]
    params = hf.get("rope_parameters") or {}
    full, local = params, None
    if "full_attention" in params or "sliding_attention" in params:
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    for key in ("partial_rotary_factor",):
        if key in full and full[key] != 1.0:
            raise _refuse(path, f"rope_parameters.{key}", full[key], "partial rotary embeddings are not implemented")
    theta = float(full.get("rope_theta", hf.get("rope_theta", defaults.get("rope_theta", 10_000.0))))
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    out = {"rope_theta": theta, "rope_scaling": _scaling(path, field, hf.get("rope_scaling") or full, hf)}
    if model_type == "gemma3_text":
        local = local or {}
        if _scaling(path, "rope_parameters.sliding_attention", local, hf) is not None:
            raise _refuse(path, "rope_parameters.sliding_attention", local, "only plain RoPE on sliding layers")
        out["rope_local_theta"] = float(local.get("rope_theta", hf.get("rope_local_base_freq",
                                                                        defaults["rope_local_base_freq"])))
    return out


def _windows(path: Path, hf: dict, model_type: str) -> dict[str, Any]:
    """sliding_window and layer_types as transformers derives them for the family."""
    get = lambda key: hf.get(key, DEFAULTS[model_type].get(key))  # noqa: E731
    layers = hf["num_hidden_layers"]
    if model_type in ("mistral", "mixtral"):
        return {"sliding_window": hf.get("sliding_window")}
    if model_type.endswith("_moe") and hf.get("use_sliding_window"):
        raise _refuse(path, "use_sliding_window", True, f"sliding windows of {model_type} are not implemented")
    if model_type in ("qwen2", "qwen3"):
        window = get("sliding_window") if hf.get("use_sliding_window") else None
        types = hf.get("layer_types") or [
            "sliding_attention" if window is not None and i >= get("max_window_layers") else "full_attention"
            for i in range(layers)]
    elif model_type.startswith("gemma"):
        if hf.get("use_bidirectional_attention"):
            raise _refuse(path, "use_bidirectional_attention", True, "only causal attention is implemented")
        window, period = get("sliding_window"), get("sliding_window_pattern") or 2
        types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
    else:
        return {}
    if "sliding_attention" not in types:
        return {}
    return {"sliding_window": window, "layer_types": tuple(types)}


def _family(path: Path, hf: dict, model_type: str) -> dict[str, Any]:
    """The DecoderConfig fields in which the family differs from Llama."""
    get = lambda key: hf.get(key, DEFAULTS[model_type].get(key))  # noqa: E731
    gemma = model_type.startswith("gemma")
    act_field = "hidden_activation" if gemma else "hidden_act"
    act = get(act_field) or "silu"
    if act not in _ACTIVATIONS:
        raise _refuse(path, act_field, act, f"implemented: {sorted(_ACTIVATIONS)}")
    if model_type == "qwen2" and hf.get("use_mrope"):
        raise _refuse(path, "use_mrope", True, "multimodal RoPE (Qwen2-VL) is not implemented")
    attention_bias = bool(get("attention_bias")) and model_type not in ("mistral", "mixtral")
    qkv_bias = model_type == "qwen2" or (model_type == "qwen2_moe" and bool(get("qkv_bias"))) or attention_bias
    out = dict(activation=_ACTIVATIONS[act], qkv_bias=qkv_bias, o_bias=attention_bias,
               mlp_bias=model_type == "llama" and bool(get("mlp_bias")),
               qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe"), **_experts(path, hf, model_type))
    if gemma:
        out.update(norm_plus_one=True, sandwich_norms=True, embed_scale=True,
                   query_pre_attn_scalar=get("query_pre_attn_scalar"),
                   attn_softcap=get("attn_logit_softcapping"), final_softcap=get("final_logit_softcapping"))
    return out


def _experts(path: Path, hf: dict, model_type: str) -> dict[str, Any]:
    """The mixture-of-experts fields, with the dense layers transformers derives (mlp_only_layers, and
    decoder_sparse_step: layer i is sparse when (i + 1) % step == 0)."""
    if model_type not in ("qwen2_moe", "qwen3_moe", "mixtral"):
        return {}
    get = lambda key: hf.get(key, DEFAULTS[model_type].get(key))  # noqa: E731
    if get("router_jitter_noise"):
        raise _refuse(path, "router_jitter_noise", hf["router_jitter_noise"], "router noise is not implemented")
    mixtral = model_type == "mixtral"
    step, only = get("decoder_sparse_step") or 1, set(get("mlp_only_layers") or ())
    dense = tuple(i for i in range(hf["num_hidden_layers"]) if i in only or (i + 1) % step)
    # transformers adds the load-balancing loss only with output_router_logits; so do we.
    aux = float(get("router_aux_loss_coef")) if hf.get("output_router_logits") else 0.0
    # transformers 5 writes Qwen's num_experts as num_local_experts (Mixtral's name), older configs as is.
    experts = hf.get("num_experts", hf.get("num_local_experts", DEFAULTS[model_type].get("num_experts")))
    return dict(num_experts=experts or DEFAULTS[model_type].get("num_local_experts"),
                experts_per_token=get("num_experts_per_tok"),
                moe_mlp_dim=hf.get("intermediate_size") if mixtral else get("moe_intermediate_size"),
                norm_topk_prob=True if mixtral else bool(get("norm_topk_prob")), dense_layers=dense,
                shared_expert_dim=get("shared_expert_intermediate_size") if model_type == "qwen2_moe" else None,
                router_aux_loss_coef=aux)


def config_from_hf(directory: str | Path, **overrides) -> DecoderConfig:
    """DecoderConfig of a Hugging Face directory; refuses any field value the model does not implement."""
    hf = read_hf_config(directory)
    path = paths.path(directory, "model.path") / "config.json"
    model_type = hf["model_type"]
    unknown = sorted(set(hf) - READ_FIELDS[model_type] - HARMLESS_FIELDS - set(TOKEN_ID_FIELDS))
    if "quantization_config" in unknown:
        raise _refuse(path, "quantization_config", hf["quantization_config"],
                      "quantized checkpoints are not read; use a float16/bfloat16/float32 checkpoint")
    if unknown:
        warnings.warn(f"{path}: fields {unknown} are not read by model_type {model_type!r} (neither here nor in "
                      "transformers' model of that type); check that the checkpoint is what you think it is",
                      stacklevel=2)
    if hf.get("attention_dropout", 0.0):
        raise _refuse(path, "attention_dropout", hf["attention_dropout"],
                      "dropout is not implemented (set it to 0.0 to train without dropout)")
    try:
        heads = hf["num_attention_heads"]
        return DecoderConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, mlp_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim", DEFAULTS[model_type].get("head_dim")),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", DEFAULTS[model_type].get("tie_word_embeddings", False))),
            max_position_embeddings=hf.get("max_position_embeddings"),
            **_family(path, hf, model_type), **_rope(path, hf, model_type), **_windows(path, hf, model_type),
            **overrides,
        )
    except KeyError as err:
        raise UserError(f"{path}: required field {err.args[0]!r} is missing") from None
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None


_LLAMA_LIKE = dict(norm_plus_one=False, sandwich_norms=False, embed_scale=False, activation="silu",
                   query_pre_attn_scalar=None, attn_softcap=None, final_softcap=None, rope_local_theta=None)
_GEMMA_LIKE = dict(norm_plus_one=True, sandwich_norms=True, embed_scale=True, activation="gelu_tanh", mlp_bias=False)


def _fits(cfg: DecoderConfig) -> dict[str, bool]:
    """Which transformers families compute exactly this model (same tensors, same math)."""
    def same(**values):
        return all(getattr(cfg, k) == v for k, v in values.items())

    attention_bias = cfg.qkv_bias == cfg.o_bias  # one flag for q, k, v and o
    dense = cfg.num_experts == 0
    # Sparse families: every layer's attention as its dense sibling's, no windows, experts of one kind.
    sparse = not dense and cfg.sliding_window is None and cfg.capacity_factor is None and not cfg.router_z_loss_coef
    return {
        "llama": dense and same(**_LLAMA_LIKE, qk_norm=False, sliding_window=None) and attention_bias,
        "qwen2": dense and same(**_LLAMA_LIKE, qk_norm=False, qkv_bias=True, o_bias=False, mlp_bias=False),
        "qwen3": dense and same(**_LLAMA_LIKE, qk_norm=True, mlp_bias=False) and attention_bias,
        "mistral": dense and same(**_LLAMA_LIKE, qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False,
                                  layer_types=None),
        "gemma2": dense and same(**_GEMMA_LIKE, qk_norm=False, rope_local_theta=None) and attention_bias,
        # Gemma 3 never scales its sliding layers' RoPE: a scaled model needs its own local base.
        "gemma3_text": dense and same(**_GEMMA_LIKE, qk_norm=True) and attention_bias
        and (cfg.rope_local_theta is not None or cfg.rope_scaling is None),
        "qwen2_moe": sparse and same(**_LLAMA_LIKE, qk_norm=False, o_bias=False, mlp_bias=False)
        and cfg.shared_expert_dim is not None,
        "qwen3_moe": sparse and same(**_LLAMA_LIKE, qk_norm=True, mlp_bias=False, shared_expert_dim=None)
        and attention_bias,
        "mixtral": sparse and same(**_LLAMA_LIKE, qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False,
                                   shared_expert_dim=None, norm_topk_prob=True, dense_layers=())
        and cfg.moe_mlp_dim == cfg.mlp_dim,
    }


def hf_model_type(cfg: DecoderConfig, preferred: str | None = None) -> str:
    """The transformers family that computes exactly this model: `preferred` when it fits."""
    fits = _fits(cfg)
    if preferred is not None and fits.get(preferred):
        return preferred
    for model_type, ok in fits.items():
        if ok:
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


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _family_to_hf(cfg: DecoderConfig, model_type: str) -> dict[str, Any]:
    """The fields of config.json in which `model_type` differs from Llama's."""
    types = list(cfg.layer_types or [
        "sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.num_layers)])
    if model_type == "llama":
        return {"hidden_act": "silu", "attention_bias": cfg.o_bias, "mlp_bias": cfg.mlp_bias}
    if model_type in ("mistral", "mixtral"):
        return {"hidden_act": "silu", "sliding_window": cfg.sliding_window} | _experts_to_hf(cfg, model_type)
    if model_type.startswith("qwen"):
        out = {"hidden_act": "silu", "use_sliding_window": cfg.sliding_window is not None,
               "sliding_window": cfg.sliding_window, "layer_types": types}
        if model_type in ("qwen3", "qwen3_moe"):
            out["attention_bias"] = cfg.o_bias
        if model_type == "qwen2_moe":
            out["qkv_bias"] = cfg.qkv_bias
        return out | _experts_to_hf(cfg, model_type)
    out = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": cfg.o_bias,
           # transformers' config class insists on an int where the value is one
           "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar or cfg.head_size),
           "sliding_window": cfg.sliding_window or 4096, "layer_types": types,
           "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.final_softcap}
    if model_type == "gemma3_text":
        out["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
    return out


def _experts_to_hf(cfg: DecoderConfig, model_type: str) -> dict[str, Any]:
    if not cfg.num_experts:
        return {}
    out = {"num_experts_per_tok": cfg.experts_per_token, "output_router_logits": cfg.router_aux_loss_coef > 0,
           "router_aux_loss_coef": cfg.router_aux_loss_coef}
    if model_type == "mixtral":
        return out | {"num_local_experts": cfg.num_experts}
    out |= {"num_experts": cfg.num_experts, "moe_intermediate_size": cfg.moe_mlp_dim, "decoder_sparse_step": 1,
            "mlp_only_layers": list(cfg.dense_layers), "norm_topk_prob": cfg.norm_topk_prob}
    return out | ({"shared_expert_intermediate_size": cfg.shared_expert_dim} if model_type == "qwen2_moe" else {})


def config_to_hf(cfg: DecoderConfig, model_type: str, dtype: str, token_ids: dict[str, Any] | None = None) -> dict:
    """config.json for `model_type` (which must fit the model: `hf_model_type`), with the checkpoint's
    token ids (bos/eos/pad, as given) and `max_position_embeddings`."""
    if hf_model_type(cfg, model_type) != model_type:
        raise UserError(f"this model cannot be written as model_type {model_type!r}; "
                        f"it can as {hf_model_type(cfg)!r}")
    if cfg.max_position_embeddings is None:
        raise UserError("DecoderConfig.max_position_embeddings is not set: it is written to config.json on export")
    out = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.mlp_dim, "head_dim": cfg.head_size,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "max_position_embeddings": cfg.max_position_embeddings,
        "torch_dtype": dtype, **{k: v for k, v in (token_ids or {}).items() if k in TOKEN_ID_FIELDS},
        **_family_to_hf(cfg, model_type),
    }
    if cfg.rope_scaling:
        scaling = dict(cfg.rope_scaling)
        if "original_max_position_embeddings" in scaling:  # transformers requires an integer (it warns on 8192.0)
            scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
        out["rope_scaling"] = scaling
    return out
