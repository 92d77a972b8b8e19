"""Gemma 4 (text; the language model of the multimodal checkpoints is the same): Gemma 3's layout with norms
that multiply by their weight (not 1 + weight), a weightless norm on the values, unscaled scores, full
layers with heads of their own width (and with `attention_k_eq_v`, values that are the keys' projection
over their own number of kv heads) and proportional RoPE; per-layer input embeddings, the last layers
sharing earlier layers' keys and values (with twice as wide MLPs), and a scalar on each layer's output.
The mixture-of-experts block beside the MLP (26B-A4B) is refused by name."""

from __future__ import annotations

from sft_sharded.families.base import (COMMON, PLAIN, Family, HfFields, layer_types, one_attention_bias, same,
                                       transposed, windows)

_DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                    "rope_theta": 1_000_000.0}}
# The options every Gemma 4 has; the sizes of its layers (`_SIZES`) vary from checkpoint to checkpoint.
_SIZES = ("global_head_dim", "global_kv_heads", "k_eq_v", "per_layer_input_dim", "per_layer_vocab_size",
          "kv_shared_layers", "double_wide_mlp")
GEMMA4_LIKE = {k: v for k, v in PLAIN.items() if k not in _SIZES} | dict(
    norm_plus_one=False, norm_scale_float32=True, sandwich_norms=True, embed_scale=True, activation="gelu_tanh",
    query_pre_attn_scalar=1.0, qk_norm=True, v_norm=True, layer_scale=True, attn_softcap=None, mlp_bias=False)


def _types(f: HfFields) -> list[str]:
    """transformers' layer types: five sliding to one full by default, and the last layer always full."""
    types = list(f.get("layer_types") or [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(f["num_hidden_layers"])])
    return types[:-1] + ["full_attention"]


def _full_layers(f: HfFields, types: list[str], k_eq_v: bool) -> tuple[int | None, int | None]:
    """(head_dim, kv heads) of the full layers. transformers >= 5.25 writes them as per_layer_config (overrides
    by layer index, which it then reads instead of the rest); the published configs as global_head_dim and
    num_global_key_value_heads (the latter read only with attention_k_eq_v)."""
    overrides = f.get("per_layer_config")
    if overrides is None:
        return f.get("global_head_dim"), f.get("num_global_key_value_heads") if k_eq_v else None
    full = {i for i, kind in enumerate(types) if kind == "full_attention"}
    values = list(overrides.values())
    uniform = all(v == values[0] for v in values) and set(values[0] if values else {}) <= {"head_dim",
                                                                                          "num_key_value_heads"}
    if {int(i) for i in overrides} != (full if values else set()) or not uniform or (
            values and "num_key_value_heads" in values[0] and not k_eq_v):
        raise f.refuse("per_layer_config", overrides, "only Gemma 4's own pattern is implemented: the same head_dim "
                       "(and, with attention_k_eq_v, num_key_value_heads) on every full_attention layer")
    return (values[0].get("head_dim"), values[0].get("num_key_value_heads")) if values else (None, None)


def _from_hf(f: HfFields) -> dict:
    if f.get("enable_moe_block"):
        raise f.refuse("enable_moe_block", True, "Gemma 4's mixture-of-experts block beside the MLP (26B-A4B: a "
                       "router with its own norm and per-expert scales) is not implemented; the dense sizes import")
    if f.get("use_bidirectional_attention"):
        raise f.refuse("use_bidirectional_attention", f["use_bidirectional_attention"],
                       "only causal attention is implemented")
    bias, k_eq_v, per_layer = bool(f.get("attention_bias")), bool(f.get("attention_k_eq_v")), \
        f.get("hidden_size_per_layer_input")
    types = _types(f)
    head_dim, kv_heads = _full_layers(f, types, k_eq_v)
    if per_layer and f.get("vocab_size_per_layer_input") != f["vocab_size"]:
        raise f.refuse("vocab_size_per_layer_input", f.get("vocab_size_per_layer_input"), "only a per-layer table "
                       f"with a row for every token (vocab_size={f['vocab_size']}) is implemented, as published")
    return dict(GEMMA4_LIKE, activation=f.activation("hidden_activation"), qkv_bias=bias, o_bias=bias,
                final_softcap=f.get("final_logit_softcapping"), global_head_dim=head_dim, global_kv_heads=kv_heads,
                k_eq_v=k_eq_v,
                per_layer_input_dim=per_layer or None,
                per_layer_vocab_size=f.get("vocab_size_per_layer_input") if per_layer else None,
                kv_shared_layers=f.get("num_kv_shared_layers") or 0,
                double_wide_mlp=bool(f.get("use_double_wide_mlp")), **windows(f.get("sliding_window"), types))


def _to_hf(cfg) -> dict:
    full = {"rope_type": "default", **dict(cfg.rope_scaling or ()), "rope_theta": cfg.rope_theta}
    return {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": cfg.o_bias,
            "sliding_window": cfg.sliding_window or 512, "layer_types": layer_types(cfg),
            "final_logit_softcapping": cfg.final_softcap, "global_head_dim": cfg.global_head_dim or cfg.head_size,
            "num_global_key_value_heads": cfg.global_kv_heads, "attention_k_eq_v": cfg.k_eq_v,
            "hidden_size_per_layer_input": cfg.per_layer_input_dim or 0,
            "vocab_size_per_layer_input": cfg.per_layer_vocab_size or cfg.vocab_size,
            "num_kv_shared_layers": cfg.kv_shared_layers, "use_double_wide_mlp": cfg.double_wide_mlp,
            "enable_moe_block": False,
            "rope_parameters": {"sliding_attention": {"rope_type": "default",
                                                      "rope_theta": cfg.rope_local_theta or cfg.rope_theta},
                                "full_attention": full}}


def _fits(cfg) -> bool:
    return (cfg.num_experts == 0 and same(cfg, **GEMMA4_LIKE)
            and cfg.rope_local_theta is not None and one_attention_bias(cfg)
            and (cfg.global_kv_heads is None or cfg.k_eq_v) and cfg.layer_types is not None
            and cfg.layer_types[-1] == "full_attention"
            and (cfg.rope_scaling is None or dict(cfg.rope_scaling)["rope_type"] == "proportional"))


def _tensors(cfg, m: dict, layer: str) -> dict:
    """The per-layer inputs' tables, projections and norms, and each layer's output scalar."""
    out = dict(m)
    if cfg.per_layer_input_dim:
        out |= {("per_layer_embedding",): ("model.embed_tokens_per_layer.weight", None, None),
                ("per_layer_projection",): ("model.per_layer_model_projection.weight", transposed, transposed),
                ("per_layer_norm", "scale"): ("model.per_layer_projection_norm.weight", None, None),
                ("layer_{i}", "per_layer_input", "w_gate"): (layer + "per_layer_input_gate.weight", transposed,
                                                             transposed),
                ("layer_{i}", "per_layer_input", "w_out"): (layer + "per_layer_projection.weight", transposed,
                                                            transposed),
                ("layer_{i}", "per_layer_input", "norm", "scale"): (layer + "post_per_layer_input_norm.weight",
                                                                    None, None)}
    out[("layer_{i}", "layer_scale")] = (layer + "layer_scalar", None, None)
    return out


FAMILY = Family(
    model_type="gemma4_text", architecture="Gemma4ForCausalLM",
    reads=COMMON | {"hidden_activation", "sliding_window", "layer_types", "attention_bias", "final_logit_softcapping",
                    "use_bidirectional_attention", "global_head_dim", "num_global_key_value_heads",
                    "attention_k_eq_v", "hidden_size_per_layer_input", "vocab_size_per_layer_input",
                    "num_kv_shared_layers", "use_double_wide_mlp", "enable_moe_block", "num_experts",
                    "top_k_experts", "moe_intermediate_size", "per_layer_config"},
    derived={"per_layer_config": "written as global_head_dim and num_global_key_value_heads, the published form "
                                 "(transformers >= 5.25 turns them into per_layer_config on load)",
             "use_bidirectional_attention": "any value but causal attention is refused",
             "num_experts": "read only with enable_moe_block, which is refused",
             "top_k_experts": "read only with enable_moe_block, which is refused",
             "moe_intermediate_size": "read only with enable_moe_block, which is refused"},
    # Every default of transformers' Gemma4TextConfig: a multimodal checkpoint's text_config leaves many out.
    defaults={"vocab_size": 262_144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
              "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "global_head_dim": 512,
              "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True, "sliding_window": 512, "vocab_size_per_layer_input": 262_144,
              "hidden_size_per_layer_input": 256, "rope_parameters": _DEFAULT_ROPE},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits, tensors=_tensors, local_rope=True,
    presets={
        # google/gemma-4-e2b-it's text_config: four sliding layers to one full, the last 20 layers sharing
        # keys and values (with twice as wide MLPs), per-layer inputs of 256 per layer.
        "gemma4-e2b": dict(GEMMA4_LIKE, vocab_size=262_144, hidden_size=1536, num_layers=35, num_heads=8,
                           num_kv_heads=1, head_dim=256, global_head_dim=512, mlp_dim=6144, rms_norm_eps=1e-6,
                           tie_embeddings=True, sliding_window=512, final_softcap=30.0,
                           layer_types=tuple("sliding_attention" if (i + 1) % 5 else "full_attention"
                                             for i in range(35)),
                           rope_theta=1_000_000.0, rope_local_theta=10_000.0,
                           rope_scaling=(("partial_rotary_factor", 0.25), ("rope_type", "proportional")),
                           per_layer_input_dim=256, per_layer_vocab_size=262_144, kv_shared_layers=20,
                           double_wide_mlp=True, max_position_embeddings=131_072),
    },
)
