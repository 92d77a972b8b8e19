"""Ministral 3 and Mistral Small 3.1/3.2 as published: `Mistral3ForConditionalGeneration`, a Ministral 3 or
Mistral text decoder beside a Pixtral vision tower and its projector, which pass through."""

from __future__ import annotations

from sft_sharded.families.base import Multimodal

MULTIMODAL = Multimodal(
    model_type="mistral3", architecture="Mistral3ForConditionalGeneration", text_model_types=("ministral3", "mistral"),
    towers=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
)
