"""The decoder's layers (flax linen, logical axis names only): RMSNorm, the gated MLP and attention.

Weights of rank 3 are declared with `self.param` and used with einsum: flax `DenseGeneral` with logical
partitioning of >2-D kernels fails under `jax.set_mesh` (flax#3676).

A layer's window and RoPE may differ from its neighbours' (Gemma's local and global layers, SmolLM3's
layers without RoPE). `sliding` and `rotary` say which a layer is: Python bools when known at trace time
(unrolled layers, or a stack whose layers are all alike), else traced bools (one scanned stack of mixed
layers): then both windows are compiled and `lax.cond` runs the layer's own (a scan needs one body for
every layer), and a layer without RoPE rotates by angle 0, which leaves q and k exactly as they are.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_sharded.models import lora, quant
from sft_sharded.models.attention import attention, dot_product_attention
from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.rope import frequencies, rotate
from sft_sharded.parallel.sharding import constrain


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init) -> jax.Array:
    cfg = module.config
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))


def weight(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init,
           keep_narrow: bool = False) -> jax.Array:
    """The parameter in the compute dtype, cast where it lives: pinning the cast copy to the parameter's
    own sharding makes each device cast its shard before the FSDP all-gather, which then moves bf16
    instead of float32 bytes (and no device casts the whole gathered weight). With `keep_narrow`, a
    parameter stored narrower than the compute dtype (a bfloat16 LoRA base under float32 compute) comes
    back as stored, for a caller that widens it a piece at a time (the vocabulary's table and head)."""
    value = quant.dequantize(param(module, name, shape, axes, init))
    dtype = jnp.dtype(module.config.dtype)
    if keep_narrow and value.dtype.itemsize < dtype.itemsize:
        return constrain(value, axes)
    return constrain(value.astype(dtype), axes)


def _bias(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
    """A bias (zeros at init) in the compute dtype."""
    return param(module, name, shape, axes, nn.initializers.zeros).astype(module.config.dtype)


def _project(module: nn.Module, x: jax.Array, spec: str, name: str, target: str, shape: tuple[int, ...],
             axes: tuple[str, ...], n_in: int) -> jax.Array:
    """x times the weight `name` (einsum `spec`; its first `n_in` dims are the input's), plus the LoRA
    delta of projection `target` when the config adapts it."""
    init = nn.initializers.normal(module.config.init_std)
    y = jnp.einsum(spec, x, weight(module, name, shape, axes, init))
    extra = lora.delta(module, target, x, spec, shape[:n_in], axes[:n_in], shape[n_in:], axes[n_in:])
    return y if extra is None else y + extra


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32 (every RMSNorm here, before its weight)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. Llama's casts the normalised x to the compute dtype, then scales;
    Gemma's (`norm_plus_one`) scales by (1 + weight) in float32, then casts, as transformers does, and
    OLMo's (`norm_scale_float32`) by the weight in float32."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
        scale = param(self, "scale", (x.shape[-1],), ("norm",), init)
        normed = rms_normalize(x, cfg.rms_norm_eps)
        if cfg.norm_plus_one:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(cfg.dtype)
        if cfg.norm_scale_float32:
            return (normed * scale.astype(jnp.float32)).astype(cfg.dtype)
        return scale.astype(cfg.dtype) * normed.astype(cfg.dtype)


ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}


def gated(cfg: DecoderConfig):
    """The gated MLP's join of its gate and up halves: act(gate) * up, or gpt-oss's clamped SwiGLU
    ((clip(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)) when `swiglu_limit` is set."""
    if cfg.swiglu_limit is None:
        act = ACTIVATIONS[cfg.activation]
        return lambda gate, up: act(gate) * up
    alpha, limit = cfg.swiglu_alpha, cfg.swiglu_limit

    def clamped(gate, up):
        gate = jnp.minimum(gate, limit)
        return (jnp.clip(up, -limit, limit) + 1) * gate * jax.nn.sigmoid(gate * alpha)

    return clamped


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (tanh GELU)."""

    config: DecoderConfig
    mlp_dim: int | None = None  # default config.mlp_dim (a MoE's shared expert has its own width)

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        d, f = cfg.hidden_size, self.mlp_dim or cfg.mlp_dim
        gate_BxTxF = _project(self, x_BxTxD, "btd,df->btf", "w_gate", "gate", (d, f), ("embed", "mlp"), 1)
        up_BxTxF = _project(self, x_BxTxD, "btd,df->btf", "w_up", "up", (d, f), ("embed", "mlp"), 1)
        if cfg.mlp_bias:
            gate_BxTxF = gate_BxTxF + _bias(self, "w_gate_bias", (f,), ("mlp",))
            up_BxTxF = up_BxTxF + _bias(self, "w_up_bias", (f,), ("mlp",))
        hidden_BxTxF = constrain(gated(cfg)(gate_BxTxF, up_BxTxF), ("batch", "length", "act_mlp"))
        out_BxTxD = _project(self, hidden_BxTxF, "btf,fd->btd", "w_down", "down", (f, d), ("mlp", "embed"), 1)
        return out_BxTxD + _bias(self, "w_down_bias", (d,), ("embed",)) if cfg.mlp_bias else out_BxTxD


class PerLayerInput(nn.Module):
    """Gemma 4: what a layer's per-layer input adds to its output, norm(out(act(gate(x)) * input))."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x_BxTxD, input_BxTxP):
        cfg = self.config
        d, p = cfg.hidden_size, cfg.per_layer_input_dim
        init = nn.initializers.normal(cfg.init_std)
        gate_BxTxP = jnp.einsum("btd,dp->btp", x_BxTxD, weight(self, "w_gate", (d, p), ("embed", None), init))
        out_BxTxD = jnp.einsum("btp,pd->btd", ACTIVATIONS[cfg.activation](gate_BxTxP) * input_BxTxP,
                               weight(self, "w_out", (p, d), (None, "embed"), init))
        return RMSNorm(cfg, name="norm")(out_BxTxD)


def _by_kind(sliding, on_sliding, on_full):
    """on_sliding() or on_full(): chosen in Python when `sliding` is a bool, else by `lax.cond`."""
    if isinstance(sliding, bool):
        return on_sliding() if sliding else on_full()
    return jax.lax.cond(sliding, on_sliding, on_full)


def _rope_frequencies(cfg: DecoderConfig, sliding, rotary):
    """(inverse frequencies, factor on cos/sin) of a layer: static per kind, selected when traced. A layer
    without RoPE has frequencies 0 when traced (angle 0: cos 1, sin 0) and None when static."""
    dim = cfg.rotary_dim or cfg.head_size
    full, local = frequencies(dim, *cfg.rope_for(False)), frequencies(dim, *cfg.rope_for(True))
    if isinstance(sliding, bool):
        inv_freq, factor = local if sliding else full
    else:
        inv_freq, factor = (jnp.where(sliding, a, b) for a, b in zip(local, full))
    if isinstance(rotary, bool):
        return (inv_freq, factor) if rotary else None
    return inv_freq * rotary, jnp.where(rotary, factor, 1.0)


def _rotate(cfg: DecoderConfig, x_BxTxNxH, positions_BxT, frequencies_):
    """RoPE on the first `rotary_dim` of each head (all of it by default); the rest passes as it is."""
    if frequencies_ is None:
        return x_BxTxNxH
    dim = cfg.rotary_dim or cfg.head_size
    if dim == x_BxTxNxH.shape[-1]:
        return rotate(x_BxTxNxH, positions_BxT, *frequencies_)
    rotated = rotate(x_BxTxNxH[..., :dim], positions_BxT, *frequencies_)
    return jnp.concatenate([rotated, x_BxTxNxH[..., dim:]], axis=-1)


class Attention(nn.Module):
    config: DecoderConfig
    values_are_keys: bool = False  # Gemma 4's k_eq_v full layers: no v projection

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, sliding, rotary=True, decode=None, cache=None,
                 shared_kv=None):
        """`decode` (kv_segment_ids, q_offset) and `cache` (k, v of this layer) are given when decoding
        with a KV cache. `shared_kv` (k, v) are another layer's keys and values, which a Gemma 4 KV-sharing
        layer attends with instead of its own. Returns (output, keys and values): the updated cache when
        decoding, this layer's k and v when a later layer shares them (kv_shared_layers), else None."""
        cfg = self.config
        d, h = cfg.hidden_size, cfg.head_size

        def project(name, heads, head_axis, width=h):
            y = _project(self, x_BxTxD, "btd,dnh->btnh", name, name[1], (d, heads, width),
                         ("embed", head_axis, "head_dim"), 1)
            return y + _bias(self, name + "_bias", (heads, width), (head_axis, "head_dim")) if cfg.qkv_bias else y

        def qk_norm(name, y):
            if not cfg.qk_norm:
                return y
            if cfg.qk_norm_across_heads:
                b, t, heads, _ = y.shape
                return RMSNorm(cfg, name=name)(y.reshape(b, t, heads * h)).reshape(y.shape)
            return RMSNorm(cfg, name=name)(y)

        frequencies_ = _rope_frequencies(cfg, sliding, rotary)
        q_BxTxNxH = project("wq", cfg.num_heads, "heads", 2 * h if cfg.attention_output_gate else h)
        gate_BxTxNxH = None
        if cfg.attention_output_gate:  # each head's projection is [query, gate] (transformers' layout)
            q_BxTxNxH, gate_BxTxNxH = q_BxTxNxH[..., :h], q_BxTxNxH[..., h:]
        q_BxTxNxH = constrain(_rotate(cfg, qk_norm("q_norm", q_BxTxNxH), positions_BxT, frequencies_),
                              ("batch", "length", "act_heads", "head_dim"))
        if cfg.query_position_scale is not None:
            beta, span = cfg.query_position_scale
            scale_BxT = 1 + beta * jnp.log1p(jnp.floor(positions_BxT.astype(jnp.float32) / span))
            q_BxTxNxH = q_BxTxNxH * scale_BxT[:, :, None, None].astype(q_BxTxNxH.dtype)
        if shared_kv is None:
            k_BxTxKxH = project("wk", cfg.num_kv_heads, "kv_heads")
            v_BxTxKxH = k_BxTxKxH if self.values_are_keys else project("wv", cfg.num_kv_heads, "kv_heads")
            k_BxTxKxH = _rotate(cfg, qk_norm("k_norm", k_BxTxKxH), positions_BxT, frequencies_)
            if cfg.v_norm:
                v_BxTxKxH = rms_normalize(v_BxTxKxH, cfg.rms_norm_eps).astype(v_BxTxKxH.dtype)  # no weight
        out_BxTxNxH, kv = self._attend(q_BxTxNxH, *(shared_kv or (k_BxTxKxH, v_BxTxKxH)), segment_ids_BxT, sliding,
                                       decode, None if shared_kv else cache)
        if gate_BxTxNxH is not None:
            out_BxTxNxH = out_BxTxNxH * jax.nn.sigmoid(gate_BxTxNxH.astype(jnp.float32)).astype(out_BxTxNxH.dtype)
        out_BxTxD = _project(self, out_BxTxNxH, "btnh,nhd->btd", "wo", "o", (cfg.num_heads, h, d),
                             ("heads", "head_dim", "embed"), 2)
        if cfg.o_bias:
            out_BxTxD = out_BxTxD + _bias(self, "wo_bias", (d,), ("embed",))
        return out_BxTxD, kv

    def _attend(self, q_BxTxNxH, k, v, segment_ids_BxT, sliding, decode, cache):
        """Attention of the queries over k and v (written into `cache` first when there is one, and read from
        it; a KV-sharing layer's k and v are already another layer's cache). Returns (output, k and v seen)."""
        cfg = self.config
        scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        sinks_N = None
        if cfg.attention_sinks:  # gpt-oss
            sinks_N = param(self, "sinks", (cfg.num_heads,), ("heads",), nn.initializers.zeros).astype(jnp.float32)
        if decode is None:
            def attend(window):
                return lambda: attention(q_BxTxNxH, k, v, segment_ids_BxT, cfg.attention, window, scale,
                                         cfg.attn_softcap, (cfg.context_attention, cfg.context_layout), sinks_N)

            kv = (k, v) if cfg.kv_shared_layers else None
            return _by_kind(sliding, attend(cfg.sliding_window), attend(None)), kv
        kv_segment_ids_BxS, offset = decode
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, offset, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, offset, 0, 0))
        # The reference takes a traced window: a full layer's is the cache's whole length.
        window = None if cfg.sliding_window is None else jnp.where(sliding, cfg.sliding_window, k.shape[1])
        out_BxTxNxH = dot_product_attention(q_BxTxNxH, k, v, segment_ids_BxT, kv_segment_ids_BxS, q_offset=offset,
                                            window=window, scale=scale, softcap=cfg.attn_softcap, sinks_N=sinks_N)
        return out_BxTxNxH, (k, v)
