"""Gemma 4 as published: `Gemma4ForConditionalGeneration`, a Gemma 4 text decoder beside a vision tower and
(the small sizes) an audio tower, each with its embedder. The decoder is `gemma4_text`; the towers pass
through."""

from __future__ import annotations

from sft_sharded.families.base import Multimodal

MULTIMODAL = Multimodal(
    model_type="gemma4", architecture="Gemma4ForConditionalGeneration", text_model_types=("gemma4_text",),
    towers=("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio."),
)
