"""config.json <-> DecoderConfig through the family records (no torch needed: the parity with transformers'
own models is in test_hf.py)."""

import dataclasses
import json

import pytest

from sft_sharded.families import FAMILIES
from sft_sharded.families.base import COMMON, ROPE_DERIVED
from sft_sharded.hf.config import TOKEN_ID_FIELDS, config_from_hf, config_to_hf, hf_model_type
from sft_sharded.models import preset


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_preset_writes_and_reads_back_as_its_own_family(model_type, tmp_path):
    family = FAMILIES[model_type]
    assert COMMON <= family.reads
    for name in family.presets:
        cfg = preset(name)
        cfg = dataclasses.replace(cfg, head_dim=cfg.head_size)  # None means hidden_size // heads; the file says which
        assert family.fits(cfg) and hf_model_type(cfg, model_type) == model_type, name
        hf = config_to_hf(cfg, model_type, "bfloat16")
        written = set(hf) - {"torch_dtype", "architectures", "model_type", *TOKEN_ID_FIELDS}
        assert written <= family.reads, sorted(written - family.reads)
        (tmp_path / "config.json").write_text(json.dumps(hf))
        assert config_from_hf(tmp_path) == cfg, name


# Families without a preset: a small config.json of each.
_SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64)
_WITHOUT_PRESET = {
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24),
    "ministral3": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                        "original_max_position_embeddings": 8, "llama_4_scaling_beta": 0.5}),
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_field_a_family_reads_is_written_on_export_or_says_where_it_goes(model_type, tmp_path):
    family = FAMILIES[model_type]
    if family.presets:
        cfgs = [preset(name) for name in family.presets]
    else:
        (tmp_path / "config.json").write_text(json.dumps(dict(_SMALL, model_type=model_type,
                                                              **_WITHOUT_PRESET[model_type])))
        cfgs = [config_from_hf(tmp_path)]
    written = set().union(*(config_to_hf(cfg, model_type, "bfloat16") for cfg in cfgs))
    accounted = written | set(family.derived) | family.carried | set(ROPE_DERIVED)
    assert family.reads <= accounted, sorted(family.reads - accounted)
    assert set(family.derived) <= family.reads, sorted(set(family.derived) - family.reads)


def test_an_unused_router_aux_coefficient_is_exported_as_the_checkpoint_had_it(tmp_path):
    source = dict(model_type="mixtral", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, num_local_experts=4,
                  num_experts_per_tok=2, output_router_logits=False, router_aux_loss_coef=0.02)
    (tmp_path / "config.json").write_text(json.dumps(source))
    cfg = config_from_hf(tmp_path)
    assert cfg.router_aux_loss_coef == 0.0  # transformers trains without it, so do we
    out = config_to_hf(cfg, "mixtral", "float32", source=source)
    assert (out["output_router_logits"], out["router_aux_loss_coef"]) == (False, 0.02)
    trained_with = config_to_hf(dataclasses.replace(cfg, router_aux_loss_coef=0.1), "mixtral", "float32",
                                source=source)
    assert (trained_with["output_router_logits"], trained_with["router_aux_loss_coef"]) == (True, 0.1)


def test_published_multimodal_gemma3_config_reads_as_the_gemma3_4b_preset(tmp_path):
    """google/gemma-3-4b-it's config.json: its text_config gives only the sizes that differ from
    transformers' defaults (not even vocab_size), and a final cap its class never applies."""
    published = {
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
        "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02,
        "mm_tokens_per_image": 256, "model_type": "gemma3", "torch_dtype": "bfloat16",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024, "final_logit_softcapping": 30.0},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False}}
    (tmp_path / "config.json").write_text(json.dumps(published))
    expected = preset("gemma3-4b")
    assert config_from_hf(tmp_path) == dataclasses.replace(expected, head_dim=256)
    assert expected.final_softcap is None and expected.vocab_size == 262208


def test_published_qwen3_5_config_reads_as_the_preset_without_warnings(tmp_path):
    """Qwen/Qwen3.5-0.8B's config.json (its text fields; the vision tower's abridged): the multimodal
    class's own tie flag, image position sections beside the RoPE base, and the fields transformers' model
    does not read (attn_output_gate, the mtp head's sizes, mamba_ssm_dtype) carried, not warned about."""
    import warnings

    layer_types = ["linear_attention"] * 3 + ["full_attention"]
    published = {
        "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "image_token_id": 248056,
        "video_token_id": 248057, "vision_start_token_id": 248053, "vision_end_token_id": 248054,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 1024, "intermediate_size": 3584,
            "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
            "attention_bias": False, "attn_output_gate": True, "hidden_act": "silu", "linear_num_key_heads": 16,
            "linear_num_value_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6, "full_attention_interval": 4,
            "max_position_embeddings": 262144, "tie_word_embeddings": True, "mtp_num_hidden_layers": 1,
            "mtp_use_dedicated_embeddings": False, "mamba_ssm_dtype": "float32", "mlp_only_layers": [],
            "eos_token_id": 248044, "layer_types": layer_types * 6, "dtype": "bfloat16",
            "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_theta": 10000000,
                                "partial_rotary_factor": 0.25, "rope_type": "default"}},
        "vision_config": {"depth": 12, "hidden_size": 768, "num_heads": 12, "intermediate_size": 3072,
                          "out_hidden_size": 1024, "model_type": "qwen3_5"}}
    (tmp_path / "config.json").write_text(json.dumps(published))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = config_from_hf(tmp_path)
    assert cfg == preset("qwen3.5-0.8b") and cfg.rotary_dim == 64 and cfg.tie_embeddings
    written = config_to_hf(cfg, "qwen3_5_text", "bfloat16", source=published)
    assert written["text_config"]["rope_parameters"]["mrope_section"] == [11, 11, 10]
    assert written["text_config"]["mtp_num_hidden_layers"] == 1 and written["tie_word_embeddings"] is True
