"""Llama (1-3.x): the decoder every other family is described against."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, one_attention_bias, same


def _from_hf(f: HfFields) -> dict:
    bias = bool(f.get("attention_bias"))
    return dict(activation=f.activation(), qkv_bias=bias, o_bias=bias, mlp_bias=bool(f.get("mlp_bias")))


def _to_hf(cfg) -> dict:
    return {"hidden_act": "silu", "attention_bias": cfg.o_bias, "mlp_bias": cfg.mlp_bias}


def _fits(cfg) -> bool:
    return (cfg.num_experts == 0 and same(cfg, **LLAMA_LIKE, qk_norm=False, sliding_window=None)
            and one_attention_bias(cfg))


_LLAMA3 = dict(vocab_size=128256, rope_theta=500_000.0, max_position_embeddings=131072)

FAMILY = Family(
    model_type="llama", architecture="LlamaForCausalLM",
    reads=COMMON | {"hidden_act", "attention_bias", "mlp_bias"},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits,
    presets={
        "llama3.2-1b": dict(_LLAMA3, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_dim=8192,
                            tie_embeddings=True),
        "llama3.1-8b": dict(_LLAMA3, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14336),
        "llama3.1-70b": dict(_LLAMA3, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                             mlp_dim=28672),
    },
)
