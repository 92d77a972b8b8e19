"""Mixtral: Mistral's attention with a mixture of experts in every layer (top-k renormalised)."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, same
from sft_sharded.families.experts import ROUTER_READS, experts_from_hf, router_to_hf, sparse


def _from_hf(f: HfFields) -> dict:
    return dict(activation=f.activation(), sliding_window=f.get("sliding_window"),
                **experts_from_hf(f, experts_dim=f["intermediate_size"], norm_topk_prob=True))


def _to_hf(cfg) -> dict:
    return {"hidden_act": "silu", "sliding_window": cfg.sliding_window, "num_local_experts": cfg.num_experts,
            **router_to_hf(cfg)}


def _fits(cfg) -> bool:
    return (sparse(cfg) and same(cfg, **LLAMA_LIKE, qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False,
                                 shared_expert_dim=None, norm_topk_prob=True, dense_layers=())
            and cfg.moe_mlp_dim == cfg.mlp_dim)


FAMILY = Family(
    model_type="mixtral", architecture="MixtralForCausalLM",
    reads=COMMON | ROUTER_READS | {"hidden_act", "sliding_window", "num_local_experts", "router_jitter_noise"},
    derived={"router_jitter_noise": "any value but 0 is refused"},
    defaults={"num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits,
    moe_names=("block_sparse_moe", "gate", {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}),
    presets={
        "mixtral-8x7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                             mlp_dim=14336, num_experts=8, experts_per_token=2, moe_mlp_dim=14336,
                             norm_topk_prob=True, rope_theta=1_000_000.0, max_position_embeddings=32768),
    },
)
