"""Phi-3 / Phi-3.5 / Phi-4: Llama's blocks with q, k and v in one tensor (`qkv_proj`) and gate and up in one
(`gate_up_proj`), optional partial rotary (Phi-4-mini), a sliding window on every layer when set.
`longrope` scaling (Phi-3.5, Phi-4-mini) is refused by name: its frequencies switch with the sequence
length, so training would not match the model transformers runs at other lengths."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, same


def _from_hf(f: HfFields) -> dict:
    for field in ("resid_pdrop", "embd_pdrop"):
        if f.get(field):
            raise f.refuse(field, f[field], "dropout is not implemented (set it to 0.0 to train without dropout)")
    scaling = f.get("rope_scaling") or f.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("longrope", "su", "yarn"):  # transformers reads "su" and "yarn" here as longrope
        field = "rope_scaling" if f.get("rope_scaling") else "rope_parameters"
        raise f.refuse(field, kind, "longrope scaling is not implemented (its short and long factors switch at "
                       "original_max_position_embeddings); a Phi-3 checkpoint without rope scaling imports")
    return dict(activation=f.activation(), sliding_window=f.get("sliding_window"))


def _to_hf(cfg) -> dict:
    out = {"hidden_act": "silu", "sliding_window": cfg.sliding_window}
    if cfg.rotary_dim:
        out["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_size
    return out


def _fits(cfg) -> bool:
    plain = {k: v for k, v in LLAMA_LIKE.items() if k != "rotary_dim"}
    return cfg.num_experts == 0 and same(cfg, **plain, qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False,
                                         layer_types=None)


FAMILY = Family(
    model_type="phi3", architecture="Phi3ForCausalLM",
    reads=COMMON | {"hidden_act", "sliding_window", "resid_pdrop", "embd_pdrop", "partial_rotary_factor",
                    "original_max_position_embeddings"},
    carried=frozenset({"original_max_position_embeddings"}),
    derived={"resid_pdrop": "any value but 0 is refused", "embd_pdrop": "any value but 0 is refused",
             "partial_rotary_factor": "written when the model rotates part of each head (rotary_dim)"},
    fused={"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits,
    presets={
        # microsoft/phi-4's config.json (no rope scaling). Phi-4-mini has no preset: its longrope is refused,
        # so a model of its shape would not be the checkpoint's model.
        "phi-4": dict(vocab_size=100352, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=10,
                      mlp_dim=17920, rope_theta=250_000.0, max_position_embeddings=16384),
    },
)
