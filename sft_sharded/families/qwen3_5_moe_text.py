"""Qwen3.5-MoE (text; `Qwen3_5MoeForCausalLM`, and the language model of the multimodal checkpoints):
Qwen3.5's layers with a mixture of experts in every layer, a gated shared expert beside the routed ones
(Qwen2-MoE's block), the router's top-k weights always renormalised. transformers fuses the experts in
memory but saves them one tensor per expert, as we read and write them."""

from __future__ import annotations

from sft_sharded.families.base import Family, HfFields
from sft_sharded.families.experts import QWEN_EXPERT_NAMES, ROUTER_READS, router_aux_coef, router_to_hf, sparse
from sft_sharded.families.qwen3_5_text import (QWEN3_5_CARRIED, QWEN3_5_DEFAULTS, QWEN3_5_DERIVED, QWEN3_5_READS,
                                               QWEN3_5_ROPE_EXTRAS, QWEN3_5_SHAPE, linear_tensors, qwen3_5_fits,
                                               qwen3_5_from_hf, qwen3_5_layers, qwen3_5_to_hf)


def _from_hf(f: HfFields) -> dict:
    experts = f["moe_intermediate_size"]
    return dict(qwen3_5_from_hf(f), num_experts=f["num_experts"], experts_per_token=f["num_experts_per_tok"],
                moe_mlp_dim=experts, norm_topk_prob=True, shared_expert_dim=f["shared_expert_intermediate_size"],
                router_aux_loss_coef=router_aux_coef(f),
                # every layer is sparse: the dense width (which the config has none of) is never used
                mlp_dim=f.get("intermediate_size") or experts)


def _to_hf(cfg) -> dict:
    return qwen3_5_to_hf(cfg) | router_to_hf(cfg) | {
        "num_experts": cfg.num_experts, "moe_intermediate_size": cfg.moe_mlp_dim,
        "shared_expert_intermediate_size": cfg.shared_expert_dim}


def _fits(cfg) -> bool:
    return (sparse(cfg) and not cfg.dense_layers and cfg.norm_topk_prob and cfg.shared_expert_dim is not None
            and qwen3_5_fits(cfg))


FAMILY = Family(
    model_type="qwen3_5_moe_text", architecture="Qwen3_5MoeForCausalLM",
    reads=QWEN3_5_READS | ROUTER_READS | {"num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"},
    derived={**QWEN3_5_DERIVED, "intermediate_size": "the dense MLP's width, which no layer has: written as "
                                                      "mlp_dim, ignored by transformers"},
    carried=QWEN3_5_CARRIED,
    defaults={**QWEN3_5_DEFAULTS, "hidden_size": 2048, "num_hidden_layers": 40, "num_key_value_heads": 2,
              "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts_per_tok": 8,
              "num_experts": 256, "router_aux_loss_coef": 0.001},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits, tensors=linear_tensors, moe_names=QWEN_EXPERT_NAMES,
    rope_extras=QWEN3_5_ROPE_EXTRAS,
    presets={
        # Qwen/Qwen3.5-35B-A3B's text_config: 256 experts of 512, 8 per token, a 512-wide shared expert
        "qwen3.5-35b-a3b": dict(QWEN3_5_SHAPE, hidden_size=2048, num_layers=40, num_heads=16, num_kv_heads=2,
                                mlp_dim=512, layer_types=qwen3_5_layers(40), linear_key_heads=16,
                                linear_value_heads=32, num_experts=256, experts_per_token=8, moe_mlp_dim=512,
                                norm_topk_prob=True, shared_expert_dim=512),
    },
)
