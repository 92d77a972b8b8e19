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

from sft_sharded.models import delta_rule
from sft_sharded.models.causal_conv import causal_conv
from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.layers import param, rms_normalize, weight


class GatedDeltaNet(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x_BxTxD, segment_ids_BxT=None):
        cfg = self.config
        d, hk, hv = cfg.hidden_size, cfg.linear_key_heads, cfg.linear_value_heads
        dk, dv, width = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_conv_width
        init = nn.initializers.normal(cfg.init_std)

        def project(name, heads, dim, axes):
            return jnp.einsum("btd,dnh->btnh", x_BxTxD, weight(self, name, (d, heads, dim), ("embed", *axes), init))

        def conv(name, y_BxTxNxH):  # the depthwise kernel over each head's channels, then SiLU
            b, t, n, h = y_BxTxNxH.shape
            kernel = weight(self, name, (n, h, width), ("heads", "head_dim", None), init).reshape(n * h, width)
            out, _ = causal_conv(y_BxTxNxH.reshape(b, t, n * h), kernel, segment_ids_BxT)
            return nn.silu(out).reshape(y_BxTxNxH.shape)

        q_BxTxHkxDk = conv("conv_q", project("wq", hk, dk, ("kv_heads", "head_dim")))
        k_BxTxHkxDk = conv("conv_k", project("wk", hk, dk, ("kv_heads", "head_dim")))
        v_BxTxHvxDv = conv("conv_v", project("wv", hv, dv, ("heads", "head_dim")))
        z_BxTxHvxDv = project("wz", hv, dv, ("heads", "head_dim"))
        b_BxTxHv, a_BxTxHv = (jnp.einsum("btd,dn->btn", x_BxTxD, weight(self, name, (d, hv), ("embed", "heads"), init))
                              for name in ("w_b", "w_a"))
        a_log = param(self, "a_log", (hv,), ("heads",), nn.initializers.zeros).astype(jnp.float32)
        dt_bias = param(self, "dt_bias", (hv,), ("heads",), nn.initializers.ones).astype(jnp.float32)
        g_BxTxHv = -jnp.exp(a_log) * jax.nn.softplus(a_BxTxHv.astype(jnp.float32) + dt_bias)
        beta_BxTxHv = jax.nn.sigmoid(b_BxTxHv.astype(jnp.float32))
        repeat = hv // hk  # each q/k head serves `repeat` consecutive value heads
        out_BxTxHvxDv, _ = delta_rule.chunked(jnp.repeat(q_BxTxHkxDk, repeat, axis=2),
                                              jnp.repeat(k_BxTxHkxDk, repeat, axis=2), v_BxTxHvxDv, g_BxTxHv,
                                              beta_BxTxHv, segment_ids_BxT)
        normed = _gated_norm(out_BxTxHvxDv, z_BxTxHvxDv, param(self, "norm", (dv,), ("norm",), nn.initializers.ones),
                             cfg.rms_norm_eps)
        return jnp.einsum("btnh,nhd->btd", normed,
                          weight(self, "wo", (hv, dv, d), ("heads", "head_dim", "embed"), init))


def _gated_norm(x, gate, scale, eps):
    """RMSNorm over each head (in float32, weight applied in x's dtype), times SiLU(gate): transformers'
    Qwen3_5RMSNormGated."""
    normed = rms_normalize(x, eps).astype(x.dtype)
    return (scale.astype(x.dtype) * normed * nn.silu(gate.astype(jnp.float32))).astype(x.dtype)
