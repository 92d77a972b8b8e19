"""Mistral: Llama with a sliding window on every layer (or none), never biases."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, same


def _from_hf(f: HfFields) -> dict:
    return dict(activation=f.activation(), sliding_window=f.get("sliding_window"))


def _to_hf(cfg) -> dict:
    return {"hidden_act": "silu", "sliding_window": cfg.sliding_window}


def _fits(cfg) -> bool:
    return cfg.num_experts == 0 and same(cfg, **LLAMA_LIKE, qk_norm=False, qkv_bias=False, o_bias=False,
                                         mlp_bias=False, layer_types=None)


FAMILY = Family(
    model_type="mistral", architecture="MistralForCausalLM",
    reads=COMMON | {"hidden_act", "sliding_window"},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits,
    presets={
        "mistral-7b": dict(vocab_size=32768, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                           mlp_dim=14336, rope_theta=1_000_000.0, max_position_embeddings=32768),
    },
)
