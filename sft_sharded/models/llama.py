"""Llama-family decoder (Llama with optional attention/MLP biases, Qwen2 with q/k/v bias, Mistral) in flax
linen, logical axis names only.

Weights of rank 3 are declared with `self.param` and used with einsum: flax `DenseGeneral` with logical
partitioning of >2-D kernels fails under `jax.set_mesh` (flax#3676). RoPE uses the Hugging Face
"rotate half" layout so that imported checkpoints need no permutation.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_sharded.choices import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from sft_sharded.models import lora, quant
from sft_sharded.models.attention import attention, dot_product_attention
from sft_sharded.models.lora import LoraConfig
from sft_sharded.sharding import constrain

RESIDUAL = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 10_000.0
    # Llama 3.x "llama3" frequency scaling as sorted (key, value) pairs: factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings. None: plain RoPE.
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # output projection (Llama's attention_bias)
    mlp_bias: bool = False  # gate/up/down projections (Llama's mlp_bias)
    # Positions the checkpoint is made for. Not used by the math (RoPE has no table); written to
    # config.json on export, where transformers reads it.
    max_position_embeddings: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # choices.REMAT_POLICIES
    scan_layers: bool = False
    attention: str = "auto"  # choices.ATTENTION_IMPLEMENTATIONS
    sliding_window: int | None = None  # Mistral-style: each token sees only the last `sliding_window` keys
    lora: LoraConfig | None = None  # LoRA adapters on the projections it targets (None: no adapters)
    init_std: float = 0.02

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"LlamaConfig.{key}={getattr(self, key)!r} must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat={self.remat!r} must be one of {REMAT_POLICIES}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"LlamaConfig.sliding_window={self.sliding_window!r} must be a positive int or None")
        if self.max_position_embeddings is not None and (
                not isinstance(self.max_position_embeddings, int) or self.max_position_embeddings < 1):
            raise ValueError(f"LlamaConfig.max_position_embeddings={self.max_position_embeddings!r} must be a "
                             "positive int or None")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"LlamaConfig.attention={self.attention!r} must be one of {ATTENTION_IMPLEMENTATIONS}")
        for key in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, key))  # raises a TypeError naming the bad dtype

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def num_adapter_params(self) -> int:
        """LoRA's A and B over all layers (0 without LoRA)."""
        if self.lora is None:
            return 0
        d, h, f = self.hidden_size, self.head_size, self.mlp_dim
        q, kv = self.num_heads * h, self.num_kv_heads * h
        sizes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
        return self.num_layers * self.lora.rank * sum(sum(sizes[t]) for t in self.lora.targets)

    def num_params(self) -> int:
        """The model's own parameters (the base, without LoRA adapters)."""
        d, h, k, f, v = self.hidden_size, self.head_size, self.num_kv_heads, self.mlp_dim, self.vocab_size
        attn = d * h * (2 * self.num_heads + 2 * k) + (h * (self.num_heads + 2 * k) if self.qkv_bias else 0)
        attn += d if self.o_bias else 0
        layer = attn + 3 * d * f + 2 * d + ((2 * f + d) if self.mlp_bias else 0)
        return self.num_layers * layer + v * d * (1 if self.tie_embeddings else 2) + d


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init) -> jax.Array:
    cfg = module.config
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init) -> jax.Array:
    """The parameter in the compute dtype, cast where it lives: pinning the cast copy to the parameter's
    own sharding makes each device cast its shard before the FSDP all-gather, which then moves bf16
    instead of float32 bytes (and no device casts the whole gathered weight)."""
    return constrain(quant.dequantize(_param(module, name, shape, axes, init)).astype(module.config.dtype), axes)


def _bias(module: nn.Module, name: str, size: int, axis: str) -> jax.Array:
    """A [size] bias (zeros at init) in the compute dtype."""
    return _param(module, name, (size,), (axis,), nn.initializers.zeros).astype(module.config.dtype)


def _project(module: nn.Module, x: jax.Array, spec: str, name: str, target: str, shape: tuple[int, ...],
             axes: tuple[str, ...], n_in: int, init) -> jax.Array:
    """x times the weight `name` (einsum `spec`; its first `n_in` dims are the input's), plus the LoRA
    delta of projection `target` when the config adapts it."""
    y = jnp.einsum(spec, x, _weight(module, name, shape, axes, init))
    extra = lora.delta(module, target, x, spec, shape[:n_in], axes[:n_in], shape[n_in:], axes[n_in:])
    return y if extra is None else y + extra


class RMSNorm(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        scale_D = _param(self, "scale", (x_BxTxD.shape[-1],), ("norm",), nn.initializers.ones)
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return scale_D.astype(self.config.dtype) * x.astype(self.config.dtype)


def _llama3_scaling(inv_freq: jax.Array, scaling: tuple[tuple[str, float], ...]) -> jax.Array:
    """Llama 3.x: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    s = dict(scaling)
    factor, low, high, context = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * jnp.pi / inv_freq
    blend = jnp.clip((context / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float, scaling=None) -> jax.Array:
    """Rotary embedding, rotate-half layout, angles in float32 (N: any number of heads)."""
    head_dim = x_BxTxNxH.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is not None:
        inv_freq = _llama3_scaling(inv_freq, scaling)
    half_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles_BxTx1xH = jnp.concatenate([half_BxTxH2, half_BxTxH2], axis=-1)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles_BxTx1xH) + rotated * jnp.sin(angles_BxTx1xH)).astype(x_BxTxNxH.dtype)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, decode=None, cache=None):
        """`decode` (kv_segment_ids, q_offset) and `cache` (k, v of this layer) are given when decoding
        with a KV cache; the layer then returns its updated cache next to the output."""
        cfg = self.config
        dtype, d, h = jnp.dtype(cfg.dtype), cfg.hidden_size, cfg.head_size
        init = nn.initializers.normal(cfg.init_std)

        def project(name, heads, head_axis):
            y = _project(self, x_BxTxD, "btd,dnh->btnh", name, name[1], (d, heads, h),
                         ("embed", head_axis, "head_dim"), 1, init)
            if cfg.qkv_bias:
                y = y + _param(self, name + "_bias", (heads, h), (head_axis, "head_dim"), nn.initializers.zeros).astype(dtype)
            return y

        q_BxTxNxH = project("wq", cfg.num_heads, "heads")
        k_BxTxKxH = project("wk", cfg.num_kv_heads, "kv_heads")
        v_BxTxKxH = project("wv", cfg.num_kv_heads, "kv_heads")
        q_BxTxNxH = constrain(rope(q_BxTxNxH, positions_BxT, cfg.rope_theta, cfg.rope_scaling), ("batch", "length", "act_heads", "head_dim"))
        k_BxTxKxH = rope(k_BxTxKxH, positions_BxT, cfg.rope_theta, cfg.rope_scaling)
        new_cache = None
        if cache is None:
            out_BxTxNxH = attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, cfg.attention,
                                    cfg.sliding_window)
        else:
            kv_segment_ids_BxS, offset = decode
            k_BxSxKxH = jax.lax.dynamic_update_slice(cache["k"], k_BxTxKxH.astype(cache["k"].dtype), (0, offset, 0, 0))
            v_BxSxKxH = jax.lax.dynamic_update_slice(cache["v"], v_BxTxKxH.astype(cache["v"].dtype), (0, offset, 0, 0))
            new_cache = {"k": k_BxSxKxH, "v": v_BxSxKxH}
            out_BxTxNxH = dot_product_attention(
                q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, kv_segment_ids_BxS, q_offset=offset,
                window=cfg.sliding_window,
            )
        out_BxTxD = _project(self, out_BxTxNxH, "btnh,nhd->btd", "wo", "o", (cfg.num_heads, h, d),
                             ("heads", "head_dim", "embed"), 2, init)
        if cfg.o_bias:
            out_BxTxD = out_BxTxD + _bias(self, "wo_bias", d, "embed")
        return out_BxTxD, new_cache


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        d, f = cfg.hidden_size, cfg.mlp_dim
        init = nn.initializers.normal(cfg.init_std)
        gate_BxTxF = _project(self, x_BxTxD, "btd,df->btf", "w_gate", "gate", (d, f), ("embed", "mlp"), 1, init)
        up_BxTxF = _project(self, x_BxTxD, "btd,df->btf", "w_up", "up", (d, f), ("embed", "mlp"), 1, init)
        if cfg.mlp_bias:
            gate_BxTxF = gate_BxTxF + _bias(self, "w_gate_bias", f, "mlp")
            up_BxTxF = up_BxTxF + _bias(self, "w_up_bias", f, "mlp")
        hidden_BxTxF = constrain(nn.silu(gate_BxTxF) * up_BxTxF, ("batch", "length", "act_mlp"))
        out_BxTxD = _project(self, hidden_BxTxF, "btf,fd->btd", "w_down", "down", (f, d), ("mlp", "embed"), 1, init)
        return out_BxTxD + _bias(self, "w_down_bias", d, "embed") if cfg.mlp_bias else out_BxTxD


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, decode=None, cache=None):
        """Returns (x, this layer's updated KV cache or None); the pair is also nn.scan's (carry, ys)."""
        cfg = self.config
        attn_BxTxD, new_cache = Attention(cfg, name="attn")(
            RMSNorm(cfg, name="attn_norm")(x_BxTxD), positions_BxT, segment_ids_BxT, decode, cache
        )
        x_BxTxD = x_BxTxD + attn_BxTxD
        x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_BxTxD))
        return constrain(x_BxTxD, RESIDUAL), new_cache


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Llama(nn.Module):
    """The decoder. Entry points (`apply(variables, ..., method=...)`):

    - `__call__(input_ids_BxT, positions=None, segment_ids=None) -> logits_BxTxV` (float32);
    - `hidden_and_head(...) -> (hidden_BxTxD, head_DxV)`: the final hidden states and the output head, for
      a loss that projects chunk by chunk (`losses.chunked_cross_entropy`);
    - `decode(input_ids_BxT, positions, segment_ids, cache) -> (logits_BxTxV, cache)`: writes the tokens
      at `cache["index"]` of a KV cache from `init_cache`.

    Shape letters, here and in every module of the model: B batch, T length (S: the KV cache's length),
    D model width (`hidden_size`), N query heads, K kv heads, H head dim, F MLP width, V vocabulary.
    """

    config: LlamaConfig

    def __call__(self, input_ids_BxT, positions=None, segment_ids=None):
        x_BxTxD, head_DxV, _ = self._forward(input_ids_BxT, positions, segment_ids, None)
        return _logits(x_BxTxD, head_DxV)

    def hidden_and_head(self, input_ids_BxT, positions=None, segment_ids=None):
        x_BxTxD, head_DxV, _ = self._forward(input_ids_BxT, positions, segment_ids, None)
        return x_BxTxD, head_DxV

    def decode(self, input_ids_BxT, positions, segment_ids, cache):
        x_BxTxD, head_DxV, new_cache = self._forward(input_ids_BxT, positions, segment_ids, cache)
        return _logits(x_BxTxD, head_DxV), new_cache

    @nn.compact
    def _forward(self, input_ids_BxT, positions, segment_ids, cache):
        """(final hidden states, output head, updated cache or None)."""
        cfg = self.config
        batch, length = input_ids_BxT.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        embedding_VxD = _weight(
            self, "embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), nn.initializers.normal(cfg.init_std)
        )
        # Look up all of the fsdp group's tokens in this device's slice of the hidden dim (the table stays
        # sharded as stored), then reshard to batch-split activations: ids and [B, T, D] rows move, never
        # the [V, D] table, and the table's gradient lands in its own shard with no reduction over fsdp.
        ids_BxT = constrain(input_ids_BxT, ("replica_batch", None))
        rows_BxTxD = constrain(jnp.take(embedding_VxD, ids_BxT, axis=0), ("replica_batch", None, "embed"))
        x_BxTxD = constrain(rows_BxTxD, RESIDUAL)

        decode = None
        if cache is not None:
            if segment_ids is None:
                segment_ids = jnp.ones((batch, length), jnp.int32)
            kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, cache["index"]))
            decode = (kv_segments, cache["index"])

        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},  # a fresh LoRA dropout mask per layer
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            layer_caches = None if cache is None else cache["layers"]
            x_BxTxD, new_layers = stack(cfg, name="layers")(x_BxTxD, positions, segment_ids, decode, layer_caches)
        else:
            new_layers = []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else cache["layers"][i]
                x_BxTxD, new_layer = layer_cls(cfg, name=f"layer_{i}")(x_BxTxD, positions, segment_ids, decode, layer_cache)
                new_layers.append(new_layer)

        x_BxTxD = RMSNorm(cfg, name="final_norm")(x_BxTxD)
        if cfg.tie_embeddings:
            head_DxV = embedding_VxD.T
        else:
            head_DxV = _weight(
                self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), nn.initializers.normal(cfg.init_std)
            )
        new_cache = None
        if cache is not None:
            new_cache = {"layers": new_layers, "segment_ids": decode[0], "index": cache["index"] + length}
        return x_BxTxD, head_DxV, new_cache


def _logits(x_BxTxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
    logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD, head_DxV, preferred_element_type=jnp.float32)
    return constrain(logits_BxTxV, ("batch", "length", "act_vocab"))


def init_cache(cfg: LlamaConfig, batch: int, max_length: int) -> dict:
    """An empty KV cache for `max_length` positions: zeros, segment 0 (nothing visible), index 0."""
    shape = (batch, max_length, cfg.num_kv_heads, cfg.head_size)
    if cfg.scan_layers:
        shape = (cfg.num_layers, *shape)
        layers = {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
    else:
        layers = [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)} for _ in range(cfg.num_layers)]
    return {"layers": layers, "segment_ids": jnp.zeros((batch, max_length), jnp.int32), "index": jnp.int32(0)}
