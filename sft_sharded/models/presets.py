"""Named model shapes: each family record's (sizes from the family's published config.json) and `tiny`."""

from __future__ import annotations

import dataclasses

from sft_sharded.errors import UserError
from sft_sharded.families import FAMILIES
from sft_sharded.models.config import DecoderConfig

PRESETS: dict[str, dict] = {
    # The built-in task's model: a few hundred thousand params, trains in minutes on a laptop CPU.
    "tiny": dict(vocab_size=384, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                 max_position_embeddings=2048),
    **{name: dict(shape) for family in FAMILIES.values() for name, shape in family.presets.items()},
}
# Vocabularies this large get the chunked loss unless a run asks otherwise: the bfloat16 logits of a 256k
# vocabulary are half a GiB per thousand tokens (the loss's float32 work on them twice that), more than the
# rest of a small model's activations.
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
