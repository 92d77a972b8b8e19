"""The one flash-style forward and backward that both jax kernels are made of: the local "xla" kernel
(`blockwise`, whose query blocks know their key spans at trace time) and the split-sequence kernel (`split`,
whose key blocks arrive around a ring or from an all-gather). A query block's output is folded together one
key block at a time with an online softmax (running maximum and sum); a single key span is a fold of one.
The backward pass recomputes a block pair's probabilities from the saved log-sum-exp instead of keeping
[T, S] probabilities. Operands stay in the inputs' dtype with float32 accumulation; statistics are float32.

Layouts: queries [b, C, K, G, H] (G query heads per kv head), keys and values [b, E, K, H], scores
[b, K, G, C, E], the running accumulator [b, K, G, C, H], per-query statistics [b, K, G, C].

Masked scores are set to MASKED before the fold: a row whose keys in one block are all hidden folds in
exp(0) terms, which the first block with a visible key rescales by exp(MASKED - max) = 0, and every query
sees itself, so every row meets a visible key before it is finished."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sft_sharded.models.attention.masking import MASKED, apply_softcap


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


def scores(q_BxCxKxGxH, k_BxExKxH, mask, opts: Options):
    """Scaled (and capped) float32 scores [b, K, G, C, E] with hidden ones at MASKED, and the capping's
    derivative (None without a cap)."""
    raw = jnp.einsum("btkgd,bskd->bkgts", q_BxCxKxGxH, k_BxExKxH, preferred_element_type=jnp.float32)
    capped, d_cap = apply_softcap(raw * np.float32(opts.scale), opts.softcap)
    return jnp.where(mask, capped, MASKED), d_cap


def start(q_BxCxKxGxH) -> Running:
    """The state before any key: nothing accumulated, the maximum at MASKED."""
    b, c, kh, g, h = q_BxCxKxGxH.shape
    return Running(jnp.zeros((b, kh, g, c, h), jnp.float32), jnp.full((b, kh, g, c), MASKED, jnp.float32),
                   jnp.zeros((b, kh, g, c), jnp.float32))


def fold(state: Running, q_BxCxKxGxH, k_BxExKxH, v_BxExKxH, mask, opts: Options) -> Running:
    """Fold one key/value block into a query block's state."""
    scores_BxKxGxCxE, _ = scores(q_BxCxKxGxH, k_BxExKxH, mask, opts)
    new_max = jnp.maximum(state.maximum, jnp.max(scores_BxKxGxCxE, axis=-1))
    probs = jnp.exp(scores_BxKxGxCxE - new_max[..., None])
    rescale = jnp.exp(state.maximum - new_max)  # what the old terms were scaled by, to the new maximum
    pv = jnp.einsum("bkgts,bskd->bkgtd", probs.astype(v_BxExKxH.dtype), v_BxExKxH,
                    preferred_element_type=jnp.float32)
    return Running(state.accumulator * rescale[..., None] + pv, new_max,
                   state.total * rescale + jnp.sum(probs, axis=-1))


def finish(state: Running, dtype, sinks_KxG=None):
    """The output [b, C, K, G, H] in `dtype` and each row's log-sum-exp [b, K, G, C]. With attention sinks
    (gpt-oss) exp(sink) joins each row's denominator: a logit that attends to nothing."""
    accumulator, maximum, total = state
    if sinks_KxG is not None:
        sink = sinks_KxG.astype(jnp.float32)[:, :, None]
        new_max = jnp.maximum(maximum, sink)
        rescale = jnp.exp(maximum - new_max)
        accumulator, maximum = accumulator * rescale[..., None], new_max
        total = total * rescale + jnp.exp(sink - new_max)
    out = jnp.moveaxis(accumulator / total[..., None], 3, 1).astype(dtype)
    return out, maximum + jnp.log(total)


def delta(out_BxCxKxGxH, d_out_BxCxKxGxH):
    """sum_d dO·O per query [b, K, G, C]: the softmax backward's sum_s P·dP without a [T, S] reduction."""
    return jnp.einsum("btkgd,btkgd->bkgt", d_out_BxCxKxGxH.astype(jnp.float32), out_BxCxKxGxH.astype(jnp.float32))


def grads(q_BxCxKxGxH, k_BxExKxH, v_BxExKxH, mask, d_out_BxCxKxGxH, lse_BxKxGxC, delta_BxKxGxC, opts: Options):
    """One block pair's share of the gradients: (dq [b, C, K, G, H], dk, dv [b, E, K, H]), float32."""
    scores_BxKxGxCxE, d_cap = scores(q_BxCxKxGxH, k_BxExKxH, mask, opts)
    probs = jnp.exp(scores_BxKxGxCxE - lse_BxKxGxC[..., None])
    dv = jnp.einsum("bkgts,btkgd->bskd", probs.astype(d_out_BxCxKxGxH.dtype), d_out_BxCxKxGxH,
                    preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("btkgd,bskd->bkgts", d_out_BxCxKxGxH, v_BxExKxH, preferred_element_type=jnp.float32)
    d_scores = probs * (d_probs - delta_BxKxGxC[..., None]) * np.float32(opts.scale)
    d_scores = (d_scores if d_cap is None else d_scores * d_cap).astype(q_BxCxKxGxH.dtype)
    dq = jnp.einsum("bkgts,bskd->btkgd", d_scores, k_BxExKxH, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgts,btkgd->bskd", d_scores, q_BxCxKxGxH, preferred_element_type=jnp.float32)
    return dq, dk, dv


def sink_grad(sinks_KxG, lse_BxKxGxT, delta_BxKxGxT):
    """The sinks' gradient: each sink's probability times (0 - delta), as it has no value to attend to."""
    p_sink_BxKxGxT = jnp.exp(sinks_KxG.astype(jnp.float32)[:, :, None] - lse_BxKxGxT)
    return -jnp.einsum("bkgt,bkgt->kg", p_sink_BxKxGxT, delta_BxKxGxT).astype(sinks_KxG.dtype)
