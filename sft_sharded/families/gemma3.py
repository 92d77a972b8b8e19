"""Gemma 3 4B/12B/27B as published: `Gemma3ForConditionalGeneration`, a Gemma 3 text decoder beside a SigLIP
vision tower and its projector. The decoder is `gemma3_text`; the tower and projector pass through."""

from __future__ import annotations

from sft_sharded.families.base import Multimodal

MULTIMODAL = Multimodal(
    model_type="gemma3", architecture="Gemma3ForConditionalGeneration", text_model_types=("gemma3_text",),
    towers=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
    # Gemma3ForConditionalGeneration's forward never applies it (Gemma3ForCausalLM does).
    ignored_text_fields=("final_logit_softcapping",),
)
