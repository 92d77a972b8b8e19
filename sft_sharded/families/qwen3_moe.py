"""Qwen3-MoE: Qwen3's attention with routed experts in the layers `decoder_sparse_step` and
`mlp_only_layers` leave sparse."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, one_attention_bias, same
from sft_sharded.families.experts import (QWEN_EXPERT_NAMES, QWEN_MOE_DERIVED, QWEN_MOE_READS, qwen_experts_from_hf,
                                          qwen_experts_to_hf, sparse)
from sft_sharded.families.qwen2 import QWEN_WINDOWS, QWEN_WINDOWS_DERIVED, qwen_windows_to_hf
from sft_sharded.families.qwen3 import QWEN3_SHAPE


def _from_hf(f: HfFields) -> dict:
    bias = bool(f.get("attention_bias"))
    return dict(activation=f.activation(), qkv_bias=bias, o_bias=bias, qk_norm=True,
                **qwen_experts_from_hf(f))


def _to_hf(cfg) -> dict:
    return qwen_windows_to_hf(cfg) | qwen_experts_to_hf(cfg) | {"attention_bias": cfg.o_bias}


def _fits(cfg) -> bool:
    return (sparse(cfg) and same(cfg, **LLAMA_LIKE, qk_norm=True, mlp_bias=False, shared_expert_dim=None)
            and one_attention_bias(cfg))


FAMILY = Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM",
    reads=COMMON | QWEN_WINDOWS | QWEN_MOE_READS | {"hidden_act", "attention_bias"},
    derived={**QWEN_WINDOWS_DERIVED, **QWEN_MOE_DERIVED},
    defaults={"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
              "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits, moe_names=QWEN_EXPERT_NAMES,
    presets={
        "qwen3-30b-a3b": dict(QWEN3_SHAPE, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                              mlp_dim=6144, num_experts=128, experts_per_token=8, moe_mlp_dim=768,
                              norm_topk_prob=True),
    },
)
