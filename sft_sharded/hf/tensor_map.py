"""Which Hugging Face tensor fills which of our parameters, and how (HF stores linear weights [out, in];
ours are [in, out] with heads split out, and experts stacked on a leading axis). Where a family fuses
projections into one tensor (Phi-3's qkv_proj), each of ours is a row slice of it.

`entries(cfg, model_type)` yields every tensor as (our param path, HF name, index, hf->ours, ours->hf):
`index` places the tensor inside a stacked param: () for a param of its own, (layer,) in a scanned stack,
(expert,) for an expert's weight, (layer, expert) for both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sft_sharded.choices import PROJECTIONS
from sft_sharded.families import FAMILIES
from sft_sharded.families.base import transposed
from sft_sharded.models.config import DecoderConfig


def _moe(cfg: DecoderConfig, model_type: str, layer: str) -> dict:
    module, router, experts = FAMILIES[model_type].moe_names
    prefix = f"{layer}{module}."
    m = {("layer_{i}", "moe", "router"): (prefix + f"{router}.weight", transposed, transposed)}
    for ours, theirs in experts.items():
        m[("layer_{i}", "moe", ours)] = (prefix + "experts.{e}." + f"{theirs}.weight", transposed, transposed)
    if cfg.shared_expert_dim:  # Qwen2-MoE
        for name in ("gate", "up", "down"):
            m[("layer_{i}", "moe", "shared_expert", f"w_{name}")] = (
                prefix + f"shared_expert.{name}_proj.weight", transposed, transposed)
        m[("layer_{i}", "moe", "shared_gate")] = (prefix + "shared_expert_gate.weight", transposed, transposed)
    return m


def _norms(cfg: DecoderConfig, layer: str) -> dict:
    """The layer's norms. "post_attention_layernorm" is the norm before the MLP in Llama, after attention
    in Gemma (which has four) and OLMo (which has no norm before attention or the MLP)."""
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if cfg.sandwich_norms:
        names = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
    elif cfg.post_norms:
        names = {"post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
    return {("layer_{i}", ours, "scale"): (layer + f"{theirs}.weight", None, None) for ours, theirs in names.items()}


def mapping(cfg: DecoderConfig, model_type: str) -> dict[tuple[str, ...], tuple[str, Any, Any]]:
    """Our param path (layer index as "{i}", expert as "{e}" in the HF name) -> (HF name, hf->ours, ours->hf)."""
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size

    def heads_in(count, width=h):
        return lambda w: w.T.reshape(d, count, width), lambda w: w.reshape(d, count * width).T

    layer = "model.layers.{i}."
    # with an output gate each head's rows are [query, gate] (Qwen3.5): one head of twice the width
    projections = {"q": heads_in(n, 2 * h if cfg.attention_output_gate else h), "k": heads_in(k), "v": heads_in(k),
                   "o": (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T),
                   "gate": (transposed, transposed), "up": (transposed, transposed), "down": (transposed, transposed)}
    m = {
        ("embedding",): ("model.embed_tokens.weight", None, None),
        ("final_norm", "scale"): ("model.norm.weight", None, None),
        **{("layer_{i}", module, weight): (layer + f"{hf}.weight", *projections[target])
           for target, (module, weight, hf) in PROJECTIONS.items()},
    }
    family = FAMILIES[model_type]
    if cfg.num_experts and family.moe_names:
        m.update(_moe(cfg, model_type, layer))
    m.update(_norms(cfg, layer))
    if cfg.qk_norm:
        for name in ("q", "k"):
            m[("layer_{i}", "attn", f"{name}_norm", "scale")] = (layer + f"self_attn.{name}_norm.weight", None, None)
    if cfg.qkv_bias:
        for name, count in (("wq", n), ("wk", k), ("wv", k)):
            m[("layer_{i}", "attn", name + "_bias")] = (
                layer + f"self_attn.{name[1]}_proj.bias", lambda w, c=count: w.reshape(c, h), lambda w: w.reshape(-1))
    if cfg.o_bias:
        m[("layer_{i}", "attn", "wo_bias")] = (layer + "self_attn.o_proj.bias", None, None)
    if cfg.mlp_bias:
        for name in ("gate", "up", "down"):
            m[("layer_{i}", "mlp", f"w_{name}_bias")] = (layer + f"mlp.{name}_proj.bias", None, None)
    if not cfg.tie_embeddings:
        m[("lm_head",)] = ("lm_head.weight", transposed, transposed)
    if family.tensors is not None:
        m = family.tensors(cfg, m, layer)
    return _fuse(m, cfg, family.fused, layer) if family.fused else m


def join(model_type: str, name: str, parts: list):
    """One HF tensor from the parts of ours that make it, in mapping order: rows one after another (a fused
    qkv_proj), or interleaved on the last axis where the family says so (gpt-oss's gate_up_proj)."""
    if len(parts) == 1:
        return parts[0]
    if name.endswith(FAMILIES[model_type].interleaved):
        return np.stack(parts, axis=-1).reshape(*parts[0].shape[:-1], -1)
    return np.concatenate(parts, axis=0)


def _fuse(m: dict, cfg: DecoderConfig, fused: dict[str, tuple[str, ...]], layer: str) -> dict:
    """Parts of a fused HF tensor read as row slices of it (export concatenates them back, in this order)."""
    h = cfg.head_size
    rows = {"self_attn.q_proj": cfg.num_heads * h, "self_attn.k_proj": cfg.num_kv_heads * h,
            "self_attn.v_proj": cfg.num_kv_heads * h, "mlp.gate_proj": cfg.mlp_dim, "mlp.up_proj": cfg.mlp_dim}
    where = {}
    for name, parts in fused.items():
        start = 0
        for part in parts:
            where[layer + part + ".weight"] = (layer + name + ".weight", start, start + rows[part])
            start += rows[part]
    out = {}
    for path, (hf_name, to_ours, to_hf) in m.items():
        if hf_name in where:
            hf_name, start, stop = where[hf_name]
            to_ours = (lambda w, f=to_ours or (lambda w: w), a=start, b=stop: f(w[a:b]))
        out[path] = (hf_name, to_ours, to_hf)
    return out


# A layer's own keys' and values' tensors: a layer that shares another's keys and values has none of them.
_KEYS = ("wk", "wk_bias", "k_norm")
_VALUES = ("wv", "wv_bias")


def _has(cfg: DecoderConfig, i: int, path: tuple[str, ...]) -> bool:
    """Whether layer i has the layer parameter `path` ("layer_{i}", ...)."""
    if path[1] in ("mlp", "moe") and (path[1] == "moe") != cfg.is_moe(i):
        return False  # a dense layer has no experts, a sparse one no dense MLP
    if path[1] in ("attn", "linear_attn") and (path[1] == "linear_attn") != cfg.is_linear(i):
        return False  # a linear-attention layer has no softmax attention, and the other way round
    if path[1] == "attn" and path[2] in _KEYS + _VALUES and cfg.kv_source(i) is not None:
        return False
    return not (path[1] == "attn" and path[2] in _VALUES and cfg.values_are_keys(i))


def unused(cfg: DecoderConfig) -> list[str]:
    """Tensors a checkpoint may hold that transformers' model drops on load (its text-only names): Gemma 4
    checkpoints keep the k/v projections and norms of the layers that share another layer's keys and values."""
    return [f"model.layers.{i}.self_attn.{name}.{kind}" for i in range(cfg.num_layers) if cfg.kv_source(i) is not None
            for name in ("k_proj", "v_proj", "k_norm", "v_norm") for kind in ("weight", "bias")]


def entries(cfg: DecoderConfig, model_type: str, naming: tuple[str, str] | None = None):
    """(our path, HF name, index, hf->ours, ours->hf) for every tensor (see the module docstring). `naming`
    (prefix, head) places the language model inside a multimodal checkpoint: the prefix replaces "model."
    and the head is the output head's name."""
    shared = mapping(cfg, model_type)
    per_layer = {}  # a layer whose shapes are its own (Gemma 4's full layers) has its own mapping

    def named(name):
        if naming is None:
            return name
        return naming[1] if name == "lm_head.weight" else naming[0] + name.removeprefix("model.")

    for path, entry in shared.items():
        if path[0] != "layer_{i}":
            yield path, named(entry[0]), (), entry[1] or (lambda w: w), entry[2] or (lambda w: w)
            continue
        for i in range(cfg.num_layers):
            if not _has(cfg, i, path):
                continue
            layer_cfg = cfg.layer(i)
            own = entry if layer_cfg is cfg else per_layer.setdefault(layer_cfg, mapping(layer_cfg, model_type))[path]
            name, to_ours, to_hf = named(own[0]), own[1] or (lambda w: w), own[2] or (lambda w: w)
            ours = (cfg.layer_name(i), *path[1:])
            layer = (i,) if cfg.scan_layers else ()
            if "{e}" not in name:
                yield ours, name.format(i=i), layer, to_ours, to_hf
                continue
            for e in range(cfg.num_experts):
                yield ours, name.format(i=i, e=e), (*layer, e), to_ours, to_hf
