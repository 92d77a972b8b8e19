"""The one flash-style forward and backward that both jax kernels are made of: the local "xla" kernel
(`blockwise`, whose query blocks know their key spans at trace time) and the split-sequence kernel (`split`,
whose key blocks arrive around a ring or from an all-gather). A query block's output is folded together one
key block at a time with an online softmax (running maximum and sum); a single key span is a fold of one.
The backward pass recomputes a block pair's probabilities from the saved log-sum-exp instead of keeping
[T, S] probabilities. Operands stay in the inputs' dtype with float32 accumulation; statistics are float32.

Layouts are head-major: queries [b, K, G, C, H] (G query heads per kv head), keys and values [b, K, E, H],
scores [b, K, G, C, E], the running accumulator and the output [b, K, G, C, H], per-query statistics
[b, K, G, C]. The callers transpose the layer's [b, T, K, ...] arrays once per call, not once per block:
every einsum here then has its batch dimensions (b, K) leading, as XLA's dots want them, where a
token-major layout made XLA copy each block's operands into that order (the side-by-side step on a CPU
ran 8-10% faster without those copies on 8 simulated devices, 6% on one: benchmarks/README.md). `delta`
takes the token-major output as the layer holds it.

Masked scores are set to MASKED before the fold: a row whose keys in one block are all hidden folds in
exp(0) terms, which the first block with a visible key rescales by exp(MASKED - max) = 0, and every query
sees itself, so every row meets a visible key before it is finished."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sft_sharded.models.attention.masking import MASKED, apply_softcap


def heads_major(x):
    """A layer's [b, T, K, G, H] queries as [b, K, G, T, H], or its [b, T, K, H] keys or values as [b, K, T, H]."""
    return jnp.transpose(x, (0, 2, 3, 1, 4) if x.ndim == 5 else (0, 2, 1, 3))


def tokens_major(x):
    """The inverse of `heads_major`: [b, K, G, T, H] -> [b, T, K, G, H], [b, K, T, H] -> [b, T, K, H]."""
    return jnp.transpose(x, (0, 3, 1, 2, 4) if x.ndim == 5 else (0, 2, 1, 3))


class Options(NamedTuple):
    """The attention's options (hashable: part of the kernels' static setup)."""

    window: int | None
    scale: float
    softcap: float | None


class Running(NamedTuple):
    """A query block's online-softmax state: the unnormalized output and each row's maximum and sum."""

    accumulator: jax.Array  # [b, K, G, C, H] float32
    maximum: jax.Array  # [b, K, G, C] float32
    total: jax.Array  # [b, K, G, C] float32


def scores(q_BxKxGxCxH, k_BxKxExH, mask, opts: Options):
    """Scaled (and capped) float32 scores [b, K, G, C, E] with hidden ones at MASKED, and the capping's
    derivative (None without a cap)."""
    raw = jnp.einsum("bkgtd,bksd->bkgts", q_BxKxGxCxH, k_BxKxExH, preferred_element_type=jnp.float32)
    capped, d_cap = apply_softcap(raw * np.float32(opts.scale), opts.softcap)
    return jnp.where(mask, capped, MASKED), d_cap


def start(q_BxKxGxCxH) -> Running:
    """The state before any key: nothing accumulated, the maximum at MASKED."""
    b, kh, g, c, h = q_BxKxGxCxH.shape
    return Running(jnp.zeros((b, kh, g, c, h), jnp.float32), jnp.full((b, kh, g, c), MASKED, jnp.float32),
                   jnp.zeros((b, kh, g, c), jnp.float32))


def fold(state: Running, q_BxKxGxCxH, k_BxKxExH, v_BxKxExH, mask, opts: Options) -> Running:
    """Fold one key/value block into a query block's state."""
    scores_BxKxGxCxE, _ = scores(q_BxKxGxCxH, k_BxKxExH, mask, opts)
    new_max = jnp.maximum(state.maximum, jnp.max(scores_BxKxGxCxE, axis=-1))
    probs = jnp.exp(scores_BxKxGxCxE - new_max[..., None])
    rescale = jnp.exp(state.maximum - new_max)  # what the old terms were scaled by, to the new maximum
    pv = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v_BxKxExH.dtype), v_BxKxExH,
                    preferred_element_type=jnp.float32)
    return Running(state.accumulator * rescale[..., None] + pv, new_max,
                   state.total * rescale + jnp.sum(probs, axis=-1))


def finish(state: Running, dtype, sinks_KxG=None):
    """The output [b, K, G, C, H] in `dtype` and each row's log-sum-exp [b, K, G, C]. With attention sinks
    (gpt-oss) exp(sink) joins each row's denominator: a logit that attends to nothing."""
    accumulator, maximum, total = state
    if sinks_KxG is not None:
        sink = sinks_KxG.astype(jnp.float32)[:, :, None]
        new_max = jnp.maximum(maximum, sink)
        rescale = jnp.exp(maximum - new_max)
        accumulator, maximum = accumulator * rescale[..., None], new_max
        total = total * rescale + jnp.exp(sink - new_max)
    out = (accumulator / total[..., None]).astype(dtype)
    return out, maximum + jnp.log(total)


def delta(out_BxCxKxGxH, d_out_BxCxKxGxH):
    """sum_d dO·O per query [b, K, G, C] of the token-major output and its gradient [b, C, K, G, H]: the
    softmax backward's sum_s P·dP without a [T, S] reduction."""
    return jnp.einsum("btkgd,btkgd->bkgt", d_out_BxCxKxGxH.astype(jnp.float32), out_BxCxKxGxH.astype(jnp.float32))


def grads(q_BxKxGxCxH, k_BxKxExH, v_BxKxExH, mask, d_out_BxKxGxCxH, lse_BxKxGxC, delta_BxKxGxC, opts: Options):
    """One block pair's share of the gradients: (dq [b, K, G, C, H], dk, dv [b, K, E, H]), float32."""
    scores_BxKxGxCxE, d_cap = scores(q_BxKxGxCxH, k_BxKxExH, mask, opts)
    probs = jnp.exp(scores_BxKxGxCxE - lse_BxKxGxC[..., None])
    dv = jnp.einsum("bkgts,bkgtd->bksd", probs.astype(d_out_BxKxGxCxH.dtype), d_out_BxKxGxCxH,
                    preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_out_BxKxGxCxH, v_BxKxExH, preferred_element_type=jnp.float32)
    d_scores = probs * (d_probs - delta_BxKxGxC[..., None]) * np.float32(opts.scale)
    d_scores = (d_scores if d_cap is None else d_scores * d_cap).astype(q_BxKxGxCxH.dtype)
    dq = jnp.einsum("bkgts,bksd->bkgtd", d_scores, k_BxKxExH, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgts,bkgtd->bksd", d_scores, q_BxKxGxCxH, preferred_element_type=jnp.float32)
    return dq, dk, dv


def sink_grad(sinks_KxG, lse_BxKxGxT, delta_BxKxGxT):
    """The sinks' gradient: each sink's probability times (0 - delta), as it has no value to attend to."""
    p_sink_BxKxGxT = jnp.exp(sinks_KxG.astype(jnp.float32)[:, :, None] - lse_BxKxGxT)
    return -jnp.einsum("bkgt,bkgt->kg", p_sink_BxKxGxT, delta_BxKxGxT).astype(sinks_KxG.dtype)
