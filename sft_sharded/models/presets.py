"""Named model shapes. Sizes from each family's published config.json."""

from __future__ import annotations

import dataclasses

from sft_sharded.errors import UserError
from sft_sharded.models.config import DecoderConfig

PRESETS: dict[str, dict] = {
    # The built-in task's model: a few hundred thousand params, trains in minutes on a laptop CPU.
    "tiny": dict(vocab_size=384, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                 max_position_embeddings=2048),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                        mlp_dim=8192, rope_theta=500_000.0, tie_embeddings=True,
                        max_position_embeddings=131072),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        mlp_dim=14336, rope_theta=500_000.0, max_position_embeddings=131072),
    "llama3.1-70b": dict(vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                         mlp_dim=28672, rope_theta=500_000.0, max_position_embeddings=131072),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         mlp_dim=4864, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True,
                         max_position_embeddings=32768),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       mlp_dim=18944, rope_theta=1_000_000.0, rms_norm_eps=1e-6, qkv_bias=True,
                       max_position_embeddings=131072),
    "mistral-7b": dict(vocab_size=32768, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       mlp_dim=14336, rope_theta=1_000_000.0, max_position_embeddings=32768),
}


def preset(name: str, **overrides) -> DecoderConfig:
    """DecoderConfig for a named shape; `overrides` replace fields (dtype, remat, ...)."""
    if name not in PRESETS:
        raise UserError(f"model.preset={name!r} is not one of {sorted(PRESETS)}")
    return dataclasses.replace(DecoderConfig(**PRESETS[name]), **overrides)
