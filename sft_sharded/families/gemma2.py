"""Gemma 2: (1 + w) RMSNorms before and after attention and the MLP, GeGLU, scaled embeddings, a query
scalar of its own, soft-capped scores and logits, alternating sliding and full layers."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, PLAIN, Family, HfFields, layer_types, one_attention_bias, same, windows

GEMMA_READS = frozenset({
    "hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types", "attention_bias",
    "final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention",
    # Older Gemma configs carry hidden_act beside hidden_activation; transformers reads the latter.
    "hidden_act"})
GEMMA_DERIVED = {"hidden_act": "not written: hidden_activation is the one transformers reads",
                 "use_bidirectional_attention": "any value but causal attention is refused"}
GEMMA_DEFAULTS = {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                  "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}
GEMMA_LIKE = dict(PLAIN, norm_plus_one=True, sandwich_norms=True, embed_scale=True, activation="gelu_tanh",
                  mlp_bias=False)


def every(period: int, layers: int) -> tuple[str, ...]:
    """Gemma's pattern: every `period`-th layer full, the others sliding (transformers' derivation)."""
    return tuple("sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers))


def gemma_from_hf(f: HfFields) -> dict:
    """What Gemma 2 and 3 read alike."""
    if f.get("use_bidirectional_attention"):
        raise f.refuse("use_bidirectional_attention", True, "only causal attention is implemented")
    bias = bool(f.get("attention_bias"))
    types = f.get("layer_types") or every(f.get("sliding_window_pattern") or 2, f["num_hidden_layers"])
    return dict(activation=f.activation("hidden_activation"), qkv_bias=bias, o_bias=bias, norm_plus_one=True,
                sandwich_norms=True, embed_scale=True, query_pre_attn_scalar=f.get("query_pre_attn_scalar"),
                attn_softcap=f.get("attn_logit_softcapping"), final_softcap=f.get("final_logit_softcapping"),
                **windows(f.get("sliding_window"), list(types)))


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def gemma_to_hf(cfg) -> dict:
    return {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": cfg.o_bias,
            # transformers' config class insists on an int where the value is one
            "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar or cfg.head_size),
            "sliding_window": cfg.sliding_window or 4096, "layer_types": layer_types(cfg),
            "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.final_softcap}


def _fits(cfg) -> bool:
    return (cfg.num_experts == 0 and same(cfg, **GEMMA_LIKE, qk_norm=False, rope_local_theta=None)
            and one_attention_bias(cfg))


GEMMA_SHAPE = dict(head_dim=256, norm_plus_one=True, sandwich_norms=True, activation="gelu_tanh", embed_scale=True,
                   query_pre_attn_scalar=256, rms_norm_eps=1e-6, tie_embeddings=True)

FAMILY = Family(
    model_type="gemma2", architecture="Gemma2ForCausalLM", reads=COMMON | GEMMA_READS, derived=GEMMA_DERIVED,
    defaults={**GEMMA_DEFAULTS, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    from_hf=gemma_from_hf, to_hf=gemma_to_hf, fits=_fits,
    presets={
        "gemma2-2b": dict(GEMMA_SHAPE, vocab_size=256000, hidden_size=2304, num_layers=26, num_heads=8,
                          num_kv_heads=4, mlp_dim=9216, sliding_window=4096, layer_types=every(2, 26),
                          attn_softcap=50.0, final_softcap=30.0, max_position_embeddings=8192),
    },
)
