"""Ministral 3 (the text of Ministral-3 3B/8B/14B, inside `mistral3` checkpoints): Mistral's blocks with YaRN
RoPE and queries scaled by position after RoPE (`llama_4_scaling_beta`: 1 + beta * log(1 + floor(pos /
original_max_position_embeddings)))."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, same

# transformers' Ministral3Config when a file gives no rope_parameters.
_ROPE = {"type": "yarn", "rope_theta": 1_000_000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}


def _from_hf(f: HfFields) -> dict:
    rope = f.get("rope_scaling") or f.get("rope_parameters")
    beta, span = rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings")
    if beta is None or span is None:
        raise f.refuse("rope_parameters", rope, "Ministral 3 needs llama_4_scaling_beta and "
                       "original_max_position_embeddings (transformers' model fails without them)")
    return dict(activation=f.activation(), sliding_window=f.get("sliding_window"),
                query_position_scale=(float(beta), int(span)))


def _to_hf(cfg) -> dict:
    beta, span = cfg.query_position_scale
    scaling = dict(cfg.rope_scaling or {"rope_type": "default"})
    rope = {**scaling, "rope_theta": cfg.rope_theta, "llama_4_scaling_beta": beta,
            "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", span))}
    return {"hidden_act": "silu", "sliding_window": cfg.sliding_window, "rope_parameters": rope}


def _fits(cfg) -> bool:
    plain = {k: v for k, v in LLAMA_LIKE.items() if k != "query_position_scale"}
    span = cfg.query_position_scale and cfg.query_position_scale[1]
    scaling_span = dict(cfg.rope_scaling or {}).get("original_max_position_embeddings", span)
    # One original_max_position_embeddings serves the YaRN ramp and the query scale.
    return (cfg.num_experts == 0 and cfg.query_position_scale is not None and scaling_span == span
            and same(cfg, **plain, qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False, layer_types=None))


FAMILY = Family(
    model_type="ministral3", architecture="Ministral3ForCausalLM",
    reads=COMMON | {"hidden_act", "sliding_window"},
    defaults={"rope_parameters": _ROPE, "head_dim": 128, "rms_norm_eps": 1e-5},
    rope_extras=frozenset({"llama_4_scaling_beta", "max_position_embeddings"}),
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits,
)
