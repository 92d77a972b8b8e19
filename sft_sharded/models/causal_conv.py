"""The short causal depthwise convolution of Gated DeltaNet layers (Qwen3.5: kernel 4 over q, k and v
channels), as transformers' `causal_conv1d_fn` computes it: out_t = sum_j w[K-1-j] x_{t-j}, with packed rows
cut at segment boundaries (a token never mixes in the tokens of the segment before it), and the state a
decoding step carries (the last K-1 inputs). Shape letters: B batch, T length, C channels, K kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sft_sharded.models.delta_rule import runs


def causal_conv(x_BxTxC: jax.Array, weight_CxK: jax.Array, segment_ids_BxT: jax.Array | None = None,
                state_BxKm1xC: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(output [B, T, C] in x's dtype, the last K-1 inputs [B, K-1, C]: the next call's `state`). `state`
    holds the inputs before this call's first token (decoding); None: zeros (the start of a row)."""
    batch, length, channels = x_BxTxC.shape
    width = weight_CxK.shape[1]
    if state_BxKm1xC is None:
        state_BxKm1xC = jnp.zeros((batch, width - 1, channels), x_BxTxC.dtype)
    padded = jnp.concatenate([state_BxKm1xC.astype(x_BxTxC.dtype), x_BxTxC], axis=1)
    run_BxT = runs(segment_ids_BxT, batch, length)
    # the state's tokens belong to the first token's segment (decoding continues one sequence)
    padded_runs = jnp.concatenate([jnp.broadcast_to(run_BxT[:, :1], (batch, width - 1)), run_BxT], axis=1)
    out = jnp.zeros((batch, length, channels), jnp.float32)
    for j in range(width):  # tap j looks j tokens back
        back = padded[:, width - 1 - j:width - 1 - j + length]
        same = padded_runs[:, width - 1 - j:width - 1 - j + length] == run_BxT
        out = out + jnp.where(same[..., None], back.astype(jnp.float32), 0.0) * weight_CxK[:, width - 1 - j]
    return out.astype(x_BxTxC.dtype), padded[:, length:]
