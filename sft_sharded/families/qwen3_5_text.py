"""Qwen3.5 (text; `Qwen3_5ForCausalLM`, and the language model of the multimodal checkpoints): three Gated
DeltaNet layers (linear attention, models/gated_deltanet.py) to one full-attention layer by default
(`layer_types`, `full_attention_interval`). The full layers are Qwen3's with an output gate (each query
head's projection twice as wide) and RoPE on a quarter of each head; every RMSNorm but the DeltaNet's gated
one scales by (1 + weight). transformers fuses the DeltaNet's q, k and v into `in_proj_qkv` (and one conv1d):
ours are three weights, row slices of it. The MoE sizes are `qwen3_5_moe_text`."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, PLAIN, Family, HfFields, one_attention_bias, same, transposed

# The options every Qwen3.5 has (the MoE ones too); sizes and layer types vary.
QWEN3_5_LIKE = {k: v for k, v in PLAIN.items() if k not in ("rotary_dim", "linear_key_heads")} | dict(
    norm_plus_one=True, sandwich_norms=False, embed_scale=False, activation="silu", query_pre_attn_scalar=None,
    attn_softcap=None, final_softcap=None, rope_local_theta=None, qk_norm=True, attention_output_gate=True,
    mlp_bias=False, sliding_window=None)
_LINEAR = {"linear_key_heads": "linear_num_key_heads", "linear_value_heads": "linear_num_value_heads",
           "linear_key_dim": "linear_key_head_dim", "linear_value_dim": "linear_value_head_dim",
           "linear_conv_width": "linear_conv_kernel_dim"}
QWEN3_5_READS = COMMON | set(_LINEAR.values()) | {
    "hidden_act", "attention_bias", "layer_types", "full_attention_interval", "partial_rotary_factor",
    "attn_output_gate", "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "mamba_ssm_dtype", "mlp_only_layers"}
QWEN3_5_DERIVED = {
    "full_attention_interval": "written as layer_types", "partial_rotary_factor": "written in rope_parameters",
    "attn_output_gate": "transformers' model always gates; a config saying false is refused"}
# rope_parameters keys of the multimodal position sections: text positions are the same in every section, so
# they change nothing here (read past, written back as the source had them).
QWEN3_5_ROPE_EXTRAS = frozenset({"mrope_section", "mrope_interleaved"})
# Written back as the source had them; transformers' model reads none of them. The multi-token-prediction
# head's sizes (a multimodal checkpoint's mtp.* tensors pass through on export), the DeltaNet state's dtype
# (float32 here whatever it says, as in transformers), and an mlp_only_layers the published configs leave empty.
QWEN3_5_CARRIED = frozenset({"mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "mamba_ssm_dtype",
                             "mlp_only_layers"})
# transformers' Qwen3_5TextConfig defaults (Qwen3.5-9B's shape) that a text_config may leave out.
QWEN3_5_DEFAULTS = {"vocab_size": 248_320, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 16,
                    "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 32_768,
                    "rms_norm_eps": 1e-6, "partial_rotary_factor": 0.25, "full_attention_interval": 4,
                    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                    "linear_num_key_heads": 16, "linear_num_value_heads": 32}


def qwen3_5_from_hf(f: HfFields) -> dict:
    if f.get("attn_output_gate", True) is not True:
        raise f.refuse("attn_output_gate", f["attn_output_gate"], "transformers' Qwen3.5 gates every full "
                       "attention layer's output; a model without the gate is another architecture")
    interval = f["full_attention_interval"]
    types = list(f.get("layer_types") or ["linear_attention" if (i + 1) % interval else "full_attention"
                                          for i in range(f["num_hidden_layers"])])
    if not set(types) <= {"linear_attention", "full_attention"}:
        raise f.refuse("layer_types", types, "Qwen3.5 layers are linear_attention or full_attention")
    bias = bool(f.get("attention_bias"))
    return dict(QWEN3_5_LIKE, activation=f.activation(), qkv_bias=bias, o_bias=bias, layer_types=tuple(types),
                **{ours: f[theirs] for ours, theirs in _LINEAR.items()})


def qwen3_5_to_hf(cfg) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": (cfg.rotary_dim or cfg.head_size) / cfg.head_size}
    return {"hidden_act": "silu", "attention_bias": cfg.o_bias, "layer_types": list(cfg.layer_types or
            ["full_attention"] * cfg.num_layers), "rope_parameters": rope, "attn_output_gate": True,
            **{theirs: getattr(cfg, ours) for ours, theirs in _LINEAR.items()}}


def qwen3_5_fits(cfg) -> bool:
    return (same(cfg, **QWEN3_5_LIKE) and one_attention_bias(cfg) and cfg.rope_scaling is None
            and (not cfg.layer_types or "sliding_attention" not in cfg.layer_types)
            and (cfg.linear_key_heads is not None or not cfg.has_linear_layers))


def linear_tensors(cfg, m: dict, layer: str) -> dict:
    """The Gated DeltaNet layers' tensors: q, k and v as row slices of in_proj_qkv and of the conv1d weight
    ([channels, 1, kernel]), the other projections, the gates' constants and the gated norm."""
    out = dict(m)
    if not cfg.has_linear_layers:
        return out
    d, width = cfg.hidden_size, cfg.linear_conv_width
    hk, hv, dk, dv = cfg.linear_key_heads, cfg.linear_value_heads, cfg.linear_key_dim, cfg.linear_value_dim
    a = layer + "linear_attn."
    start = 0
    for name, heads, dim in (("q", hk, dk), ("k", hk, dk), ("v", hv, dv)):
        stop = start + heads * dim
        out[("layer_{i}", "linear_attn", "w" + name)] = (
            a + "in_proj_qkv.weight", lambda w, s=start, e=stop, n=heads, h=dim: w[s:e].T.reshape(d, n, h),
            lambda w: w.reshape(d, -1).T)
        out[("layer_{i}", "linear_attn", "conv_" + name)] = (
            a + "conv1d.weight", lambda w, s=start, e=stop, n=heads, h=dim: w[s:e, 0].reshape(n, h, width),
            lambda w: w.reshape(-1, 1, width))
        start = stop
    out |= {("layer_{i}", "linear_attn", "wz"): (a + "in_proj_z.weight", lambda w: w.T.reshape(d, hv, dv),
                                                 lambda w: w.reshape(d, -1).T),
            ("layer_{i}", "linear_attn", "w_b"): (a + "in_proj_b.weight", transposed, transposed),
            ("layer_{i}", "linear_attn", "w_a"): (a + "in_proj_a.weight", transposed, transposed),
            ("layer_{i}", "linear_attn", "a_log"): (a + "A_log", None, None),
            ("layer_{i}", "linear_attn", "dt_bias"): (a + "dt_bias", None, None),
            ("layer_{i}", "linear_attn", "norm"): (a + "norm.weight", None, None),
            ("layer_{i}", "linear_attn", "wo"): (a + "out_proj.weight", lambda w: w.T.reshape(hv, dv, d),
                                                 lambda w: w.reshape(-1, d).T)}
    return out


def _fits(cfg) -> bool:
    return cfg.num_experts == 0 and qwen3_5_fits(cfg)


# Shared by the Qwen3.5 presets (their published text_config), the MoE ones included.
QWEN3_5_SHAPE = dict(QWEN3_5_LIKE, vocab_size=248_320, head_dim=256, rope_theta=10_000_000.0, rotary_dim=64,
                     rms_norm_eps=1e-6, max_position_embeddings=262_144, linear_key_dim=128, linear_value_dim=128,
                     linear_conv_width=4)


def qwen3_5_layers(count: int) -> tuple[str, ...]:
    """Three linear-attention layers to one full layer (full_attention_interval 4)."""
    return tuple("linear_attention" if (i + 1) % 4 else "full_attention" for i in range(count))


FAMILY = Family(
    model_type="qwen3_5_text", architecture="Qwen3_5ForCausalLM",
    reads=QWEN3_5_READS | {"intermediate_size"}, derived=QWEN3_5_DERIVED, carried=QWEN3_5_CARRIED,
    defaults={**QWEN3_5_DEFAULTS, "intermediate_size": 12_288},
    from_hf=qwen3_5_from_hf, to_hf=qwen3_5_to_hf, fits=_fits, tensors=linear_tensors,
    rope_extras=QWEN3_5_ROPE_EXTRAS,
    presets={
        # Qwen/Qwen3.5-0.8B's text_config (tied head, 16 q/k and 16 value heads in the linear layers)
        "qwen3.5-0.8b": dict(QWEN3_5_SHAPE, hidden_size=1024, num_layers=24, num_heads=8, num_kv_heads=2,
                             mlp_dim=3584, tie_embeddings=True, layer_types=qwen3_5_layers(24), linear_key_heads=16,
                             linear_value_heads=16),
        # Qwen/Qwen3.5-9B's text_config (transformers' Qwen3_5TextConfig defaults are this shape)
        "qwen3.5-9b": dict(QWEN3_5_SHAPE, hidden_size=4096, num_layers=32, num_heads=16, num_kv_heads=4,
                           mlp_dim=12_288, layer_types=qwen3_5_layers(32), linear_key_heads=16, linear_value_heads=32),
        # Qwen/Qwen3.5-27B's text_config (64 layers, 24 heads over 4 kv heads, 48 linear value heads)
        "qwen3.5-27b": dict(QWEN3_5_SHAPE, hidden_size=5120, num_layers=64, num_heads=24, num_kv_heads=4,
                            mlp_dim=17_408, layer_types=qwen3_5_layers(64), linear_key_heads=16,
                            linear_value_heads=48),
    },
)
