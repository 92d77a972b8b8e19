"""SmolLM3: Llama with RoPE left out of every `no_rope_layer_interval`-th layer (`no_rope_layers` lists
1 for a layer with RoPE, 0 without), and optional sliding windows on layers without RoPE."""

from __future__ import annotations

from sft_sharded.families.base import COMMON, LLAMA_LIKE, Family, HfFields, layer_types, one_attention_bias, same, \
    windows


def _from_hf(f: HfFields) -> dict:
    layers = f["num_hidden_layers"]
    interval = f.get("no_rope_layer_interval")
    has_rope = f.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(has_rope) != layers:
        raise f.refuse("no_rope_layers", has_rope, f"it needs one entry per layer ({layers})")
    window = f.get("sliding_window") if f.get("use_sliding_window") else None
    types = f.get("layer_types") or [
        "sliding_attention" if window is not None and not has_rope[i] else "full_attention" for i in range(layers)]
    bias = bool(f.get("attention_bias"))
    return dict(activation=f.activation(), qkv_bias=bias, o_bias=bias, mlp_bias=bool(f.get("mlp_bias")),
                nope_layers=tuple(i for i, rope in enumerate(has_rope) if not rope),
                **(windows(window, list(types)) if window is not None else {}))


def _to_hf(cfg) -> dict:
    return {"hidden_act": "silu", "attention_bias": cfg.o_bias, "mlp_bias": cfg.mlp_bias,
            "no_rope_layers": [int(i not in cfg.nope_layers) for i in range(cfg.num_layers)],
            "use_sliding_window": cfg.sliding_window is not None, "sliding_window": cfg.sliding_window,
            "layer_types": layer_types(cfg)}


def _fits(cfg) -> bool:
    plain = {k: v for k, v in LLAMA_LIKE.items() if k != "nope_layers"}
    # A window on every layer (Mistral's) has no SmolLM3 layer_types entry saying so.
    return (cfg.num_experts == 0 and same(cfg, **plain, qk_norm=False) and one_attention_bias(cfg)
            and (cfg.sliding_window is None or cfg.layer_types is not None))


FAMILY = Family(
    model_type="smollm3", architecture="SmolLM3ForCausalLM",
    reads=COMMON | {"hidden_act", "attention_bias", "mlp_bias", "use_sliding_window", "sliding_window",
                    "no_rope_layers", "no_rope_layer_interval", "layer_types"},
    defaults={"rope_theta": 2_000_000.0, "tie_word_embeddings": True, "no_rope_layer_interval": 4},
    derived={"no_rope_layer_interval": "not written: no_rope_layers lists every layer"},
    from_hf=_from_hf, to_hf=_to_hf, fits=_fits,
    presets={
        # SmolLM3-3B's config.json.
        "smollm3-3b": dict(vocab_size=128256, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=4,
                           mlp_dim=11008, rope_theta=5_000_000.0, rms_norm_eps=1e-6, tie_embeddings=True,
                           max_position_embeddings=65536, nope_layers=tuple(range(3, 36, 4))),
    },
)
