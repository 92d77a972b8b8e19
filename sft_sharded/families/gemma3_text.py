"""Gemma 3 (text): Gemma 2 with q/k RMSNorms in place of the score soft-cap, five sliding layers to each
full one, and a RoPE base of their own (never scaled) on the sliding layers."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, Family, HfFields, one_attention_bias, same
from sft_sharded.families.gemma2 import (GEMMA_DEFAULTS, GEMMA_DERIVED, GEMMA_LIKE, GEMMA_READS, GEMMA_SHAPE, every,
                                         gemma_from_hf, gemma_to_hf)


def _from_hf(f: HfFields) -> dict:
    return gemma_from_hf(f) | {"qk_norm": True}


def _to_hf(cfg) -> dict:
    return gemma_to_hf(cfg) | {"rope_local_base_freq": cfg.rope_local_theta or cfg.rope_theta}


def _fits(cfg) -> bool:
    # Gemma 3 never scales its sliding layers' RoPE: a scaled model needs its own local base.
    return (cfg.num_experts == 0 and same(cfg, **GEMMA_LIKE, qk_norm=True) and one_attention_bias(cfg)
            and (cfg.rope_local_theta is not None or cfg.rope_scaling is None))


_GEMMA3 = dict(GEMMA_SHAPE, qk_norm=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0)

FAMILY = Family(
    model_type="gemma3_text", architecture="Gemma3ForCausalLM",
    reads=COMMON | GEMMA_READS | {"rope_local_base_freq", "sliding_window_pattern"},
    derived={**GEMMA_DERIVED, "sliding_window_pattern": "not written: layer_types lists every layer"},
    # Every default of transformers' Gemma3TextConfig: the text_config of a published multimodal checkpoint
    # (Gemma 3 4B) gives only the sizes that differ from them, not even vocab_size.
    defaults={**GEMMA_DEFAULTS, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
              "sliding_window_pattern": 6, "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
              "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
              "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits, local_rope=True,
    presets={
        "gemma3-1b": dict(_GEMMA3, vocab_size=262144, hidden_size=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                          mlp_dim=6912, sliding_window=512, layer_types=every(6, 26), max_position_embeddings=32768),
        # Sizes of the multimodal checkpoint's text_config.
        "gemma3-4b": dict(_GEMMA3, vocab_size=262208, hidden_size=2560, num_layers=34, num_heads=8, num_kv_heads=4,
                          mlp_dim=10240, sliding_window=1024, layer_types=every(6, 34),
                          rope_scaling=(("factor", 8.0), ("rope_type", "linear")), max_position_embeddings=131072),
    },
)
