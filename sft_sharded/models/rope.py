"""Rotary position embeddings (the Hugging Face "rotate half" layout, so imported checkpoints need no
permutation) and the frequency scalings transformers implements for long context, computed as its
`modeling_rope_utils` does: "llama3" (Llama 3.x), "linear" (position interpolation; Gemma 3's global
layers), "yarn" (Qwen3's long-context configs) and "proportional" (Gemma 4's full layers: the first
`partial_rotary_factor` of the frequencies, the rest 0, so those dimensions pass unrotated). "dynamic" NTK
scaling is not here on purpose: its frequencies change with the length of the batch, so a model trained with
it would not be the model transformers runs; `hf.config` refuses it by name."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# Per type: (required keys, optional keys) besides "rope_type".
SCALING_TYPES = {
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "linear": ({"factor"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "proportional": (set(), {"factor", "partial_rotary_factor"}),
}


def check_scaling(scaling: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The scaling as sorted (key, value) pairs, or a ValueError naming what is wrong with it."""
    kind = scaling.get("rope_type")
    if kind not in SCALING_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not implemented (implemented: {sorted(SCALING_TYPES)})")
    required, optional = SCALING_TYPES[kind]
    missing = sorted(k for k in required if scaling.get(k) is None)
    unknown = sorted(set(scaling) - required - optional - {"rope_type"})
    if missing or unknown:
        raise ValueError(f"{kind} rope scaling needs {sorted(required)} (optional: {sorted(optional)}); "
                         f"missing {missing}, unknown {unknown}")
    return tuple(sorted((k, v) for k, v in scaling.items() if v is not None))


def _llama3(inv_freq: jax.Array, s: dict) -> jax.Array:
    """Long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    low, high, context = s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * jnp.pi / inv_freq
    blend = jnp.clip((context / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - blend) * inv_freq / s["factor"] + blend * inv_freq


def _yarn(inv_freq: jax.Array, s: dict, theta: float, dim: int) -> tuple[jax.Array, float]:
    """Interpolated frequencies below a ramp, extrapolated above it, and the factor on cos and sin."""
    factor, context = float(s["factor"]), s["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1 - ramp
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, float(attention)


def frequencies(head_dim: int, theta, scaling: tuple | None) -> tuple[jax.Array, float]:
    """(inverse frequencies [head_dim / 2], factor on cos and sin). `theta` may be traced."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq, 1.0
    s = dict(scaling)
    kind = s["rope_type"]
    if kind == "llama3":
        return _llama3(inv_freq, s), 1.0
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "proportional":
        rotated = int(s.get("partial_rotary_factor", 1.0) * head_dim // 2)
        inv_freq = jnp.where(jnp.arange(head_dim // 2) < rotated, inv_freq, 0.0)
        return inv_freq / s.get("factor", 1.0), 1.0
    return _yarn(inv_freq, s, theta, head_dim)


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta, scaling=None) -> jax.Array:
    """Rotary embedding of [B, T, N, H] (N: any number of heads), angles in float32."""
    inv_freq, attention_factor = frequencies(x_BxTxNxH.shape[-1], theta, scaling)
    return rotate(x_BxTxNxH, positions_BxT, inv_freq, attention_factor)


def rotate(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array, attention_factor=1.0) -> jax.Array:
    half_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles_BxTx1xH = jnp.concatenate([half_BxTxH2, half_BxTxH2], axis=-1)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = jnp.cos(angles_BxTx1xH) * attention_factor, jnp.sin(angles_BxTx1xH) * attention_factor
    return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)
