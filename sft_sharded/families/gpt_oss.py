"""gpt-oss (20B, 120B): a mixture of experts in every layer with attention sinks, q/k/v/o biases, sliding and
full layers alternating, YaRN; the router has a bias, every expert's projections have biases, gate and up are
interleaved in one tensor, and the experts join them with a clamped SwiGLU. Norm weights apply in float32."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, layer_types, same, transposed, \
    windows
from sft_sharded.families.experts import ROUTER_READS, router_aux_coef, router_to_hf

_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096, "rope_theta": 150_000.0}


def _from_hf(f: HfFields) -> dict:
    types = f.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(f["num_hidden_layers"])]
    bias = bool(f.get("attention_bias"))
    return dict(activation=f.activation(), qkv_bias=bias, o_bias=bias, norm_scale_float32=True, attention_sinks=True,
                num_experts=f["num_local_experts"], experts_per_token=f["num_experts_per_tok"],
                moe_mlp_dim=f["intermediate_size"], norm_topk_prob=True, router_bias=True, expert_bias=True,
                swiglu_limit=float(f.get("swiglu_limit")), swiglu_alpha=float(f.get("swiglu_alpha")),
                router_aux_loss_coef=router_aux_coef(f),
                **windows(f.get("sliding_window"), list(types)))


def _to_hf(cfg) -> dict:
    return {"hidden_act": "silu", "attention_bias": cfg.o_bias, "sliding_window": cfg.sliding_window or 128,
            "layer_types": layer_types(cfg), "num_local_experts": cfg.num_experts, "swiglu_limit": cfg.swiglu_limit,
            "swiglu_alpha": cfg.swiglu_alpha, **router_to_hf(cfg)}


def _fits(cfg) -> bool:
    plain = {k: v for k, v in LLAMA_LIKE.items()
             if k not in ("norm_scale_float32", "attention_sinks", "router_bias", "expert_bias", "swiglu_limit")}
    return (cfg.num_experts > 0 and cfg.swiglu_limit is not None and cfg.qkv_bias == cfg.o_bias
            and cfg.capacity_factor is None and not cfg.router_z_loss_coef and cfg.moe_mlp_dim == cfg.mlp_dim
            and same(cfg, **plain, norm_scale_float32=True, attention_sinks=True, router_bias=True, expert_bias=True,
                     qk_norm=False, mlp_bias=False, shared_expert_dim=None, norm_topk_prob=True, dense_layers=()))


def _tensors(cfg, m: dict, layer: str) -> dict:
    """Sinks, the router's bias, and the experts stored whole per layer as [experts, in, out] (not one
    tensor per expert), gate and up interleaved in gate_up_proj."""
    moe, experts = layer + "mlp.", layer + "mlp.experts."
    return m | {
        ("layer_{i}", "attn", "sinks"): (layer + "self_attn.sinks", None, None),
        ("layer_{i}", "moe", "router"): (moe + "router.weight", transposed, transposed),
        ("layer_{i}", "moe", "router_bias"): (moe + "router.bias", None, None),
        ("layer_{i}", "moe", "w_gate"): (experts + "gate_up_proj", lambda w: w[..., ::2], None),
        ("layer_{i}", "moe", "w_up"): (experts + "gate_up_proj", lambda w: w[..., 1::2], None),
        ("layer_{i}", "moe", "w_down"): (experts + "down_proj", None, None),
        ("layer_{i}", "moe", "w_gate_bias"): (experts + "gate_up_proj_bias", lambda w: w[..., ::2], None),
        ("layer_{i}", "moe", "w_up_bias"): (experts + "gate_up_proj_bias", lambda w: w[..., 1::2], None),
        ("layer_{i}", "moe", "w_down_bias"): (experts + "down_proj_bias", None, None),
    }


def _preset(layers: int, experts: int) -> dict:
    return dict(vocab_size=201088, hidden_size=2880, num_layers=layers, num_heads=64, num_kv_heads=8, head_dim=64,
                mlp_dim=2880, qkv_bias=True, o_bias=True, norm_scale_float32=True, attention_sinks=True,
                num_experts=experts, experts_per_token=4, moe_mlp_dim=2880, norm_topk_prob=True, router_bias=True,
                expert_bias=True, swiglu_limit=7.0, sliding_window=128,
                layer_types=tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)),
                rope_theta=150_000.0, max_position_embeddings=131072,
                rope_scaling=tuple(sorted((k, v) for k, v in _DEFAULT_ROPE.items() if k != "rope_theta")))


FAMILY = Family(
    model_type="gpt_oss", architecture="GptOssForCausalLM",
    reads=COMMON | ROUTER_READS | {"hidden_act", "attention_bias", "sliding_window", "layer_types",
                                   "num_local_experts", "swiglu_alpha", "swiglu_limit"},
    defaults={"rope_parameters": _DEFAULT_ROPE, "attention_bias": True, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
              "router_aux_loss_coef": 0.001, "sliding_window": 128, "rms_norm_eps": 1e-5, "head_dim": 64},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits, tensors=_tensors,
    interleaved=("experts.gate_up_proj", "experts.gate_up_proj_bias"),
    # The published checkpoints store the experts' weights in MXFP4 (sft_sharded/hf/mxfp4.py); export writes
    # them unquantized in the export dtype.
    quantizations=("mxfp4",),
    presets={
        # openai/gpt-oss-20b's and gpt-oss-120b's config.json: alike but for depth and the number of experts.
        "gpt-oss-20b": _preset(layers=24, experts=32),
        "gpt-oss-120b": _preset(layers=36, experts=128),
    },
)
