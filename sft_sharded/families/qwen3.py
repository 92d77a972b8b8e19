"""Qwen3: Qwen2 with q/k RMSNorm over each head and `attention_bias` in place of the fixed q/k/v biases."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, one_attention_bias, same
from sft_sharded.families.qwen2 import (QWEN_WINDOWS, QWEN_WINDOWS_DERIVED, WINDOW_DEFAULTS, qwen_windows,
                                        qwen_windows_to_hf)


def _from_hf(f: HfFields) -> dict:
    bias = bool(f.get("attention_bias"))
    return dict(activation=f.activation(), qkv_bias=bias, o_bias=bias, qk_norm=True, **qwen_windows(f))


def _to_hf(cfg) -> dict:
    return qwen_windows_to_hf(cfg) | {"attention_bias": cfg.o_bias}


def _fits(cfg) -> bool:
    return cfg.num_experts == 0 and same(cfg, **LLAMA_LIKE, qk_norm=True, mlp_bias=False) and one_attention_bias(cfg)


# Shared by the Qwen3 presets, the MoE ones included.
QWEN3_SHAPE = dict(vocab_size=151936, head_dim=128, qk_norm=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                   max_position_embeddings=40960)

FAMILY = Family(
    model_type="qwen3", architecture="Qwen3ForCausalLM",
    reads=COMMON | QWEN_WINDOWS | {"hidden_act", "attention_bias"}, derived=QWEN_WINDOWS_DERIVED,
    defaults={"head_dim": 128, **WINDOW_DEFAULTS},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits,
    presets={
        "qwen3-0.6b": dict(QWEN3_SHAPE, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, mlp_dim=3072,
                           tie_embeddings=True),
        "qwen3-8b": dict(QWEN3_SHAPE, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, mlp_dim=12288),
    },
)
