"""One record per Hugging Face `model_type` (see `base.Family`). Adding a family whose layers the decoder
already has is one new module here and its line below. The order is the order of preference when an
export has to pick the family of a model (the first that fits)."""

from __future__ import annotations

from sft_sharded.families import (gemma2, gemma3, gemma3_text, gemma4, gemma4_text, gpt_oss, llama, ministral3, mistral,
                                  mistral3, mixtral, olmo2, olmo3, phi3, qwen2, qwen2_moe, qwen3, qwen3_5,
                                  qwen3_5_moe_text, qwen3_5_text, qwen3_moe, smollm3)
from sft_sharded.families.base import Family, HfFields, Multimodal

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mistral.FAMILY, gemma2.FAMILY, gemma3_text.FAMILY, qwen2_moe.FAMILY,
    qwen3_moe.FAMILY, mixtral.FAMILY, olmo2.FAMILY, olmo3.FAMILY, smollm3.FAMILY,
    phi3.FAMILY, ministral3.FAMILY, gpt_oss.FAMILY, gemma4_text.FAMILY, qwen3_5_text.FAMILY,
    qwen3_5_moe_text.FAMILY)}

# Checkpoints whose language model is one of the families above (its `text_config`).
MULTIMODAL: dict[str, Multimodal] = {m.model_type: m for m in (
    gemma3.MULTIMODAL, mistral3.MULTIMODAL, gemma4.MULTIMODAL, qwen3_5.MULTIMODAL, qwen3_5.MOE_MULTIMODAL)}

__all__ = ["FAMILIES", "MULTIMODAL", "Family", "HfFields", "Multimodal"]
