"""Qwen2-MoE: Qwen2's attention (q/k/v biases by `qkv_bias`) with routed experts and a gated shared expert."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, same
from sft_sharded.families.experts import (QWEN_EXPERT_NAMES, QWEN_MOE_DERIVED, QWEN_MOE_READS, qwen_experts_from_hf,
                                          qwen_experts_to_hf, sparse)
from sft_sharded.families.qwen2 import QWEN_WINDOWS, QWEN_WINDOWS_DERIVED, qwen_windows_to_hf


def _from_hf(f: HfFields) -> dict:
    return dict(activation=f.activation(), qkv_bias=bool(f.get("qkv_bias")),
                shared_expert_dim=f.get("shared_expert_intermediate_size"),
                **qwen_experts_from_hf(f))


def _to_hf(cfg) -> dict:
    return (qwen_windows_to_hf(cfg) | qwen_experts_to_hf(cfg)
            | {"qkv_bias": cfg.qkv_bias, "shared_expert_intermediate_size": cfg.shared_expert_dim})


def _fits(cfg) -> bool:
    return (sparse(cfg) and same(cfg, **LLAMA_LIKE, qk_norm=False, o_bias=False, mlp_bias=False)
            and cfg.shared_expert_dim is not None)


FAMILY = Family(
    model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM",
    reads=COMMON | QWEN_WINDOWS | QWEN_MOE_READS | {"hidden_act", "qkv_bias", "shared_expert_intermediate_size"},
    derived={**QWEN_WINDOWS_DERIVED, **QWEN_MOE_DERIVED},
    defaults={"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "qkv_bias": True,
              "shared_expert_intermediate_size": 5632, "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits, moe_names=QWEN_EXPERT_NAMES,
)
