"""What a family record is: the transformers `model_type` it stands for, the config.json fields its model
reads (with transformers' defaults where a file leaves one out), how those become DecoderConfig fields and
back, which DecoderConfig it can write exactly, its tensor names where they differ from Llama's, and its
named shapes. `hf.config` and `hf.tensor_map` loop over the records; nothing else knows a family by name.

Fields every family reads (`COMMON`) and the plain-Llama values of the options (`LLAMA_LIKE`) are here,
so a record lists only where its family differs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft_sharded.errors import UserError

if TYPE_CHECKING:
    from sft_sharded.models.config import DecoderConfig

# Read by the transformers model of every supported type (modeling_<type>.py and its config class).
COMMON = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "rms_norm_eps", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_dropout", "max_position_embeddings",
})
# Options only some families have: a family's `fits` starts from these and names what differs.
PLAIN = dict(post_norms=False, norm_scale_float32=False, qk_norm_across_heads=False, rotary_dim=None, nope_layers=(),
             query_position_scale=None, attention_sinks=False, router_bias=False, expert_bias=False,
             swiglu_limit=None, global_head_dim=None, global_kv_heads=None, k_eq_v=False, v_norm=False,
             layer_scale=False, per_layer_input_dim=None, per_layer_vocab_size=None, kv_shared_layers=0,
             double_wide_mlp=False, linear_key_heads=None, attention_output_gate=False)
# The options of a plain Llama decoder.
LLAMA_LIKE = dict(PLAIN, norm_plus_one=False, sandwich_norms=False, embed_scale=False, activation="silu",
                  query_pre_attn_scalar=None, attn_softcap=None, final_softcap=None, rope_local_theta=None)
# Read by every family, written on export only in the form the model has: the RoPE scaling as the family
# writes it (rope_scaling, or rope_parameters with the base inside), nothing for plain RoPE.
ROPE_DERIVED = {"rope_scaling": "written when the model scales RoPE, in the family's form",
                "rope_parameters": "written when the model scales RoPE, in the family's form"}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # transformers' name -> ours


@dataclasses.dataclass(frozen=True)
class HfFields:
    """One config.json as its family reads it: a value the file leaves out is the family's default."""

    path: Path | str  # where the values are, for messages
    values: Mapping[str, Any]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def get(self, key: str, fallback: Any = None) -> Any:
        return self.values.get(key, self.defaults.get(key, fallback))

    def __getitem__(self, key: str) -> Any:
        """A required field: the file's value, else the family's default; a KeyError names it."""
        if key in self.values:
            return self.values[key]
        return self.defaults[key]

    def refuse(self, field: str, value: Any, why: str) -> UserError:
        return UserError(f"{self.path}: {field}={json.dumps(value)} is not supported: {why}")

    def activation(self, field: str = "hidden_act") -> str:
        act = self.get(field) or "silu"
        if act not in ACTIVATIONS:
            raise self.refuse(field, act, f"implemented: {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[act]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    model_type: str
    architecture: str  # the transformers class written to config.json's "architectures"
    reads: frozenset[str]  # every config.json field transformers' model of this type reads
    # DecoderConfig fields in which this family differs from Llama, from a config.json (refusing by name
    # what is not implemented); windows and experts included.
    from_hf: Callable[[HfFields], dict[str, Any]]
    # The config.json fields in which this family differs from Llama, for a model it fits.
    to_hf: Callable[[DecoderConfig], dict[str, Any]]
    # Whether transformers' model of this type computes exactly this DecoderConfig (same tensors, same math).
    fits: Callable[[DecoderConfig], bool]
    # transformers' values for fields a config.json may leave out
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    local_rope: bool = False  # sliding layers have a RoPE base of their own (Gemma 3)
    # Keys of the RoPE parameters that are not the frequency scaling's: the family's from_hf reads them.
    rope_extras: frozenset[str] = frozenset()
    # The mixture-of-experts block's tensor names: (module, router, {our expert weight: theirs}).
    moe_names: tuple[str, str, Mapping[str, str]] | None = None
    # Fields that do not change the math here but describe the checkpoint: written back as the source had them.
    carried: frozenset[str] = frozenset()
    # Fields read but not written back as such, each with where its value goes instead (another field, a
    # refusal of any value but the default): with `carried` and what to_hf writes, every field of `reads`
    # is accounted for on export (tests/test_hf_config.py).
    derived: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # HF tensors that hold several projections one after another (rows of [out, in]): {fused name: parts},
    # names relative to the layer ("self_attn.qkv_proj": ("self_attn.q_proj", ...)).
    fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # The family's own tensor names where the shared rule has no place for them: (config, the shared
    # mapping, the layer's name prefix) -> the mapping (hf.tensor_map.mapping's format).
    tensors: Callable[[DecoderConfig, dict, str], dict] | None = None
    # Values of quantization_config.quant_method whose weights import dequantizes (gpt-oss: "mxfp4").
    quantizations: tuple[str, ...] = ()
    # HF tensors (name suffixes) that hold two of ours interleaved on their last axis (gpt-oss's gate_up_proj).
    interleaved: tuple[str, ...] = ()
    # Named shapes of this family (DecoderConfig fields), sizes from its published config.json files.
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


def transposed(w):
    """HF's [out, in] linear weight as ours [in, out] (and back)."""
    return w.T


def same(cfg: DecoderConfig, **values: Any) -> bool:
    return all(getattr(cfg, k) == v for k, v in values.items())


def one_attention_bias(cfg: DecoderConfig) -> bool:
    """transformers' `attention_bias` is one flag for q, k, v and o."""
    return cfg.qkv_bias == cfg.o_bias


def layer_types(cfg: DecoderConfig) -> list[str]:
    """Each layer's attention as transformers' `layer_types` lists it."""
    return list(cfg.layer_types or [
        "sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.num_layers)])


def windows(sliding_window: int | None, types_: list[str]) -> dict[str, Any]:
    """DecoderConfig's window fields for per-layer types (nothing when no layer slides)."""
    if "sliding_attention" not in types_:
        return {}
    return {"sliding_window": sliding_window, "layer_types": tuple(types_)}


def rope_scaling_to_hf(cfg: DecoderConfig) -> dict[str, Any] | None:
    """DecoderConfig.rope_scaling as config.json writes it."""
    if not cfg.rope_scaling:
        return None
    scaling = dict(cfg.rope_scaling)
    if "original_max_position_embeddings" in scaling:  # transformers requires an integer (it warns on 8192.0)
        scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return scaling


@dataclasses.dataclass(frozen=True, kw_only=True)
class Multimodal:
    """A checkpoint whose language model is one of our families, beside towers we leave untouched (vision,
    audio): its text is fine-tuned, the towers are copied byte for byte on export."""

    model_type: str
    architecture: str
    text_model_types: tuple[str, ...]  # the families its `text_config` may be (the first when it names none)
    # Where the language model's tensors live, in each naming transformers has saved: the prefix that replaces
    # a text-only checkpoint's "model.", and the names its output head has had (an untied one).
    text_prefixes: tuple[str, ...] = ("language_model.model.", "model.language_model.")
    heads: tuple[str, ...] = ("lm_head.weight", "language_model.lm_head.weight")
    towers: tuple[str, ...]  # prefixes of the tensors that are not the language model's
    # text_config fields the multimodal class does not apply (Gemma 3's never soft-caps its logits): read as
    # absent, written back as they were.
    ignored_text_fields: tuple[str, ...] = ()
    # The class's own tie_word_embeddings default (it ties by its flag, not text_config's): Gemma's ties.
    tie_default: bool = True
