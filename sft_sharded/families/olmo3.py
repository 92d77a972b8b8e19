"""OLMo 3: OLMo 2 with three sliding-window layers to each full one; RoPE scaling (YaRN) applies to the
full layers only, the sliding ones keep plain RoPE with a base of their own."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, Family, HfFields, layer_types, one_attention_bias, \
    rope_scaling_to_hf, same, windows
from sft_sharded.families.olmo2 import OLMO_LIKE, olmo_from_hf, olmo_to_hf

# transformers gives the sliding layers of a config without per-layer rope_parameters this base, whatever
# rope_theta says (OLMo 3's published configs use it for both).
SLIDING_THETA = 500_000.0


def _from_hf(f: HfFields) -> dict:
    types = f.get("layer_types") or [
        "sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(f["num_hidden_layers"])]
    return olmo_from_hf(f) | windows(f.get("sliding_window"), list(types))


def _to_hf(cfg) -> dict:
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(rope_scaling_to_hf(cfg) or {})}
    sliding = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    return olmo_to_hf(cfg) | {"sliding_window": cfg.sliding_window or 4096, "layer_types": layer_types(cfg),
                              "rope_parameters": {"full_attention": full, "sliding_attention": sliding}}


def _fits(cfg) -> bool:
    # Without a base of their own, sliding layers share the full layers' RoPE, scaling included.
    return (cfg.num_experts == 0 and same(cfg, **{k: v for k, v in OLMO_LIKE.items() if k != "rope_local_theta"})
            and one_attention_bias(cfg) and (cfg.rope_local_theta is not None or cfg.rope_scaling is None))


FAMILY = Family(
    model_type="olmo3", architecture="Olmo3ForCausalLM",
    reads=COMMON | {"hidden_act", "attention_bias", "sliding_window", "layer_types"},
    defaults={"rms_norm_eps": 1e-5, "rope_theta": 500_000.0, "rope_local_base_freq": SLIDING_THETA,
              "sliding_window": 4096},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits, local_rope=True,
    presets={
        # Olmo-3-1025-7B's config.json.
        "olmo3-7b": dict(vocab_size=100278, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                         mlp_dim=11008, rms_norm_eps=1e-6, max_position_embeddings=65536, rope_theta=500_000.0,
                         rope_local_theta=500_000.0, sliding_window=4096,
                         layer_types=tuple("sliding_attention" if (i + 1) % 4 else "full_attention"
                                           for i in range(32)),
                         rope_scaling=(("attention_factor", 1.2079441541679836), ("beta_fast", 32.0),
                                       ("beta_slow", 1.0), ("factor", 8.0),
                                       ("original_max_position_embeddings", 8192), ("rope_type", "yarn")),
                         post_norms=True, norm_scale_float32=True, qk_norm=True, qk_norm_across_heads=True),
    },
)
