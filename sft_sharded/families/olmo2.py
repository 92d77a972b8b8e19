"""OLMo 2: Llama's blocks with the norms moved after attention and after the MLP (none before), an RMSNorm
over all of q's (and k's) heads together, and norm weights applied in float32."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, one_attention_bias, same

OLMO_LIKE = dict(LLAMA_LIKE, post_norms=True, norm_scale_float32=True, qk_norm=True, qk_norm_across_heads=True,
                 mlp_bias=False)


def olmo_from_hf(f: HfFields) -> dict:
    bias = bool(f.get("attention_bias"))
    return dict(activation=f.activation(), qkv_bias=bias, o_bias=bias, post_norms=True, norm_scale_float32=True,
                qk_norm=True, qk_norm_across_heads=True)


def olmo_to_hf(cfg) -> dict:
    return {"hidden_act": "silu", "attention_bias": cfg.o_bias}


def _fits(cfg) -> bool:
    return cfg.num_experts == 0 and same(cfg, **OLMO_LIKE, sliding_window=None) and one_attention_bias(cfg)


FAMILY = Family(
    model_type="olmo2", architecture="Olmo2ForCausalLM", reads=COMMON | {"hidden_act", "attention_bias"},
    defaults={"rms_norm_eps": 1e-5},
    from_hf=olmo_from_hf, to_hf=olmo_to_hf, fits=_fits,
    presets={
        "olmo2-1b": dict(vocab_size=100352, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
                         mlp_dim=8192, rope_theta=500_000.0, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         post_norms=True, norm_scale_float32=True, qk_norm=True, qk_norm_across_heads=True),
    },
)
