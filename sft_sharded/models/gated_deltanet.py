"""A Gated DeltaNet layer (the linear attention of Qwen3.5 and Qwen3-Next), as transformers'
`Qwen3_5GatedDeltaNet` computes it: q, k and v projected, each through the short causal convolution and
SiLU; per value head a decay g = -exp(A_log) softplus(a + dt_bias) and an update strength beta = sigmoid(b);
the gated delta rule (`delta_rule.chunked`, L2-normalised q and k, each q/k head serving consecutive value
heads); an RMSNorm per head gated by SiLU(z); the output projection. q, k and v are three weights here
(transformers fuses them in `in_proj_qkv` and one conv1d): sharded by head, a fused axis would cut across them.
Shape letters as in decoder.py, and Hk/Hv key/value heads, Dk/Dv their widths."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_sharded.errors import UserError
from sft_sharded.models import delta_rule
from sft_sharded.models.causal_conv import causal_conv
from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.layers import param, rms_normalize, weight
from sft_sharded.parallel.sharding import sequence_shards


class GatedDeltaNet(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x_BxTxD, segment_ids_BxT=None, cache=None):
        """(output [B, T, D], the updated decoding state or None). `cache` (decoding: `init_cache`) is the
        convolution's last inputs for q, k and v and the delta rule's state; the call continues from it."""
        cfg = self.config
        d, hk, hv = cfg.hidden_size, cfg.linear_key_heads, cfg.linear_value_heads
        dk, dv, width = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_conv_width
        init = nn.initializers.normal(cfg.init_std)
        if sequence_shards(x_BxTxD.shape[1]) > 1:
            raise UserError("linear-attention layers (Gated DeltaNet) with the sequence split over the mesh's "
                            "context axis are not implemented (the state would pass from shard to shard); "
                            "set mesh.context=1")
        conv_states = (None,) * 3 if cache is None else cache[:3]

        def project(name, heads, dim, axes):
            return jnp.einsum("btd,dnh->btnh", x_BxTxD, weight(self, name, (d, heads, dim), ("embed", *axes), init))

        def conv(name, y_BxTxNxH, head_axis, state):  # the depthwise kernel over each head's channels, then SiLU
            b, t, n, h = y_BxTxNxH.shape
            kernel = weight(self, name, (n, h, width), (head_axis, "head_dim", None), init).reshape(n * h, width)
            out, state = causal_conv(y_BxTxNxH.reshape(b, t, n * h), kernel, segment_ids_BxT, state)
            return nn.silu(out).reshape(y_BxTxNxH.shape), state

        q_BxTxHkxDk, q_state = conv("conv_q", project("wq", hk, dk, ("kv_heads", "head_dim")), "kv_heads",
                                    conv_states[0])
        k_BxTxHkxDk, k_state = conv("conv_k", project("wk", hk, dk, ("kv_heads", "head_dim")), "kv_heads",
                                    conv_states[1])
        v_BxTxHvxDv, v_state = conv("conv_v", project("wv", hv, dv, ("heads", "head_dim")), "heads", conv_states[2])
        z_BxTxHvxDv = project("wz", hv, dv, ("heads", "head_dim"))
        b_BxTxHv, a_BxTxHv = (jnp.einsum("btd,dn->btn", x_BxTxD, weight(self, name, (d, hv), ("embed", "heads"), init))
                              for name in ("w_b", "w_a"))
        a_log = param(self, "a_log", (hv,), ("heads",), nn.initializers.zeros).astype(jnp.float32)
        dt_bias = param(self, "dt_bias", (hv,), ("heads",), nn.initializers.ones).astype(jnp.float32)
        g_BxTxHv = -jnp.exp(a_log) * jax.nn.softplus(a_BxTxHv.astype(jnp.float32) + dt_bias)
        beta_BxTxHv = jax.nn.sigmoid(b_BxTxHv.astype(jnp.float32))
        repeat = hv // hk  # each q/k head serves `repeat` consecutive value heads
        q, k = (jnp.repeat(y, repeat, axis=2) for y in (q_BxTxHkxDk, k_BxTxHkxDk))
        if cache is not None and x_BxTxD.shape[1] == 1:  # one decoding step: the recurrent form
            out_BxTxHvxDv, state = delta_rule.recurrent(q, k, v_BxTxHvxDv, g_BxTxHv, beta_BxTxHv, cache[3])
        else:
            out_BxTxHvxDv, state = delta_rule.chunked(q, k, v_BxTxHvxDv, g_BxTxHv, beta_BxTxHv, segment_ids_BxT,
                                                      chunk=cfg.linear_chunk,
                                                      initial_state_BxHxKxV=None if cache is None else cache[3])
        normed = _gated_norm(out_BxTxHvxDv, z_BxTxHvxDv, param(self, "norm", (dv,), ("norm",), nn.initializers.ones),
                             cfg.rms_norm_eps)
        out_BxTxD = jnp.einsum("btnh,nhd->btd", normed,
                               weight(self, "wo", (hv, dv, d), ("heads", "head_dim", "embed"), init))
        return out_BxTxD, None if cache is None else (q_state, k_state, v_state, state)


def init_state(cfg: DecoderConfig, batch: int) -> tuple:
    """An empty decoding state of one layer: zero convolution inputs (for q, k and v) and a zero delta-rule
    state (float32)."""
    keys, values = cfg.linear_key_heads * cfg.linear_key_dim, cfg.linear_value_heads * cfg.linear_value_dim
    conv = [jnp.zeros((batch, cfg.linear_conv_width - 1, c), cfg.dtype) for c in (keys, keys, values)]
    state = jnp.zeros((batch, cfg.linear_value_heads, cfg.linear_key_dim, cfg.linear_value_dim), jnp.float32)
    return (*conv, state)


def _gated_norm(x, gate, scale, eps):
    """RMSNorm over each head (in float32, weight applied in x's dtype), times SiLU(gate): transformers'
    Qwen3_5RMSNormGated."""
    normed = rms_normalize(x, eps).astype(x.dtype)
    return (scale.astype(x.dtype) * normed * nn.silu(gate.astype(jnp.float32))).astype(x.dtype)
