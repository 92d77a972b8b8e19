"""Named model shapes. Sizes from each family's published config.json (Gemma 3 4B: its text_config)."""

from __future__ import annotations

import dataclasses

from sft_sharded.errors import UserError
from sft_sharded.models.config import DecoderConfig



def _every(period: int, layers: int) -> tuple[str, ...]:
    """Gemma's pattern: every `period`-th layer global, the others sliding (transformers' derivation)."""
    return tuple("sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers))


_QWEN3 = dict(vocab_size=151936, head_dim=128, qk_norm=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
              max_position_embeddings=40960)
_GEMMA = dict(head_dim=256, norm_plus_one=True, sandwich_norms=True, activation="gelu_tanh", embed_scale=True,
              query_pre_attn_scalar=256, rms_norm_eps=1e-6, tie_embeddings=True)
_GEMMA3 = dict(_GEMMA, qk_norm=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0)

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
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, mlp_dim=3072,
                       tie_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, mlp_dim=12288),
    "gemma2-2b": dict(_GEMMA, vocab_size=256000, hidden_size=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                      mlp_dim=9216, sliding_window=4096, layer_types=_every(2, 26), attn_softcap=50.0,
                      final_softcap=30.0, max_position_embeddings=8192),
    "gemma3-1b": dict(_GEMMA3, vocab_size=262144, hidden_size=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                      mlp_dim=6912, sliding_window=512, layer_types=_every(6, 26), max_position_embeddings=32768),
    "gemma3-4b": dict(_GEMMA3, vocab_size=262208, hidden_size=2560, num_layers=34, num_heads=8, num_kv_heads=4,
                      mlp_dim=10240, sliding_window=1024, layer_types=_every(6, 34),
                      rope_scaling=(("factor", 8.0), ("rope_type", "linear")), max_position_embeddings=131072),
    "qwen3-30b-a3b": dict(_QWEN3, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, mlp_dim=6144,
                          num_experts=128, experts_per_token=8, moe_mlp_dim=768, norm_topk_prob=True),
    "mixtral-8x7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                         mlp_dim=14336, num_experts=8, experts_per_token=2, moe_mlp_dim=14336, norm_topk_prob=True,
                         rope_theta=1_000_000.0, max_position_embeddings=32768),
}
# Vocabularies this large get the chunked loss unless a run asks otherwise: the float32 logits of a 256k
# vocabulary are 1 GiB per thousand tokens, more than the rest of a small model's activations.
LARGE_VOCAB, DEFAULT_LOSS_CHUNK = 200_000, 1024


def loss_chunk(cfg: DecoderConfig, requested: int | None) -> int | None:
    """The loss chunk a run uses: the one asked for, else DEFAULT_LOSS_CHUNK for a large vocabulary."""
    if requested is not None:
        return requested
    return DEFAULT_LOSS_CHUNK if cfg.vocab_size >= LARGE_VOCAB else None


def preset(name: str, **overrides) -> DecoderConfig:
    """DecoderConfig for a named shape; `overrides` replace fields (dtype, remat, ...)."""
    if name not in PRESETS:
        raise UserError(f"model.preset={name!r} is not one of {sorted(PRESETS)}")
    return dataclasses.replace(DecoderConfig(**PRESETS[name]), **overrides)
