"""Qwen3.5 as published: `Qwen3_5ForConditionalGeneration` / `Qwen3_5MoeForConditionalGeneration`, a Qwen3.5
text decoder (dense or MoE) beside a vision tower, with the multi-token-prediction head (mtp.*) that
transformers does not load. The decoder is `qwen3_5_text` / `qwen3_5_moe_text`; the tower and the mtp
tensors pass through."""

from __future__ import annotations

from sft_sharded.families.base import Multimodal

_TOWERS = ("model.visual.", "mtp.")

MULTIMODAL = Multimodal(
    model_type="qwen3_5", architecture="Qwen3_5ForConditionalGeneration", text_model_types=("qwen3_5_text",),
    towers=_TOWERS, tie_default=False,
)
MOE_MULTIMODAL = Multimodal(
    model_type="qwen3_5_moe", architecture="Qwen3_5MoeForConditionalGeneration",
    text_model_types=("qwen3_5_moe_text",), towers=_TOWERS, tie_default=False,
)
