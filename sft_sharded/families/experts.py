"""What the mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) read and write alike: the router's
fields and the dense layers transformers derives. Not a family itself."""

from __future__ import annotations

from sft_sharded.families.base import HfFields

ROUTER_READS = frozenset({"num_experts_per_tok", "output_router_logits", "router_aux_loss_coef"})
QWEN_MOE_READS = ROUTER_READS | {"num_experts", "num_local_experts", "moe_intermediate_size",
                                 "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob"}
QWEN_MOE_DERIVED = {"num_local_experts": "written as num_experts (transformers 5 reads either name)"}
QWEN_EXPERT_NAMES = ("mlp", "gate", {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"})


def experts_from_hf(f: HfFields, *, experts_dim: int, norm_topk_prob: bool) -> dict:
    """The experts' DecoderConfig fields, with the dense layers transformers derives (mlp_only_layers, and
    decoder_sparse_step: layer i is sparse when (i + 1) % step == 0)."""
    if f.get("router_jitter_noise"):
        raise f.refuse("router_jitter_noise", f["router_jitter_noise"], "router noise is not implemented")
    step, only = f.get("decoder_sparse_step") or 1, set(f.get("mlp_only_layers") or ())
    # transformers 5 writes Qwen's num_experts as num_local_experts (Mixtral's name), older configs as is.
    experts = f.values.get("num_experts", f.values.get("num_local_experts"))
    return dict(num_experts=experts or f.get("num_experts") or f.get("num_local_experts"),
                experts_per_token=f.get("num_experts_per_tok"), moe_mlp_dim=experts_dim,
                norm_topk_prob=norm_topk_prob,
                dense_layers=tuple(i for i in range(f["num_hidden_layers"]) if i in only or (i + 1) % step),
                router_aux_loss_coef=router_aux_coef(f))


def router_aux_coef(f: HfFields) -> float:
    """transformers adds the load-balancing loss only with output_router_logits; so do we."""
    return float(f.get("router_aux_loss_coef")) if f.get("output_router_logits") else 0.0


def qwen_experts_from_hf(f: HfFields) -> dict:
    if f.get("use_sliding_window"):
        raise f.refuse("use_sliding_window", True, "sliding windows of mixture-of-experts Qwen are not implemented")
    return experts_from_hf(f, experts_dim=f.get("moe_intermediate_size"), norm_topk_prob=bool(f.get("norm_topk_prob")))


def router_to_hf(cfg) -> dict:
    return {"num_experts_per_tok": cfg.experts_per_token, "output_router_logits": cfg.router_aux_loss_coef > 0,
            "router_aux_loss_coef": cfg.router_aux_loss_coef}


def qwen_experts_to_hf(cfg) -> dict:
    return router_to_hf(cfg) | {"num_experts": cfg.num_experts, "moe_intermediate_size": cfg.moe_mlp_dim,
                                "decoder_sparse_step": 1, "mlp_only_layers": list(cfg.dense_layers),
                                "norm_topk_prob": cfg.norm_topk_prob}


def sparse(cfg) -> bool:
    """Every layer's attention as its dense sibling's, no windows, experts of one kind (dropless, no z-loss)."""
    return (cfg.num_experts > 0 and cfg.sliding_window is None and cfg.capacity_factor is None
            and not cfg.router_z_loss_coef)
