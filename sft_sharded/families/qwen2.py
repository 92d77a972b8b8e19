"""Qwen2 / Qwen2.5: Llama with q/k/v biases (always) and Qwen's window rule."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, layer_types, same, windows

# The window fields of every dense Qwen (and, for the refusal, the MoE ones).
QWEN_WINDOWS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})
QWEN_WINDOWS_DERIVED = {"max_window_layers": "not written: layer_types, which transformers reads first, says "
                                             "which layers slide"}
WINDOW_DEFAULTS = {"sliding_window": 4096, "max_window_layers": 28}


def qwen_windows(f: HfFields) -> dict:
    """transformers' rule: with use_sliding_window, layers from max_window_layers on slide."""
    window = f.get("sliding_window") if f.get("use_sliding_window") else None
    types = f.get("layer_types") or [
        "sliding_attention" if window is not None and i >= f.get("max_window_layers") else "full_attention"
        for i in range(f["num_hidden_layers"])]
    return windows(window, types)


def qwen_windows_to_hf(cfg) -> dict:
    return {"hidden_act": "silu", "use_sliding_window": cfg.sliding_window is not None,
            "sliding_window": cfg.sliding_window, "layer_types": layer_types(cfg)}


def _from_hf(f: HfFields) -> dict:
    if f.get("use_mrope"):
        raise f.refuse("use_mrope", True, "multimodal RoPE (Qwen2-VL) is not implemented")
    return dict(activation=f.activation(), qkv_bias=True, **qwen_windows(f))


def _fits(cfg) -> bool:
    return cfg.num_experts == 0 and same(cfg, **LLAMA_LIKE, qk_norm=False, qkv_bias=True, o_bias=False,
                                         mlp_bias=False)


_QWEN25 = dict(vocab_size=151936, rope_theta=1_000_000.0, rms_norm_eps=1e-6, qkv_bias=True)

FAMILY = Family(
    model_type="qwen2", architecture="Qwen2ForCausalLM",
    reads=COMMON | QWEN_WINDOWS | {"hidden_act", "use_mrope"}, defaults=WINDOW_DEFAULTS,
    derived={**QWEN_WINDOWS_DERIVED, "use_mrope": "true is refused (multimodal RoPE); false is the default"},
    from_hf=_from_hf, to_hf=qwen_windows_to_hf, fits=_fits,
    presets={
        "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, mlp_dim=4864,
                             tie_embeddings=True, max_position_embeddings=32768),
        "qwen2.5-7b": dict(_QWEN25, vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                           num_kv_heads=4, mlp_dim=18944, max_position_embeddings=131072),
    },
)
