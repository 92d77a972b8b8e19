"""The shared flash-style forward and backward (`models/attention/flash.py`) against float64 numpy: folding
key blocks one at a time in any order gives the softmax over all of them (rows hidden from a whole block
included), sinks join the denominator, and one block pair's gradients sum to the whole gradient. The
references are token-major ([B, T, K, ...]); the kernels take and give heads-major arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_sharded.models.attention import flash

B, T, K, G, H = 2, 12, 2, 2, 8


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, K, G, H))
    k, v = rng.standard_normal((B, T, K, H)), rng.standard_normal((B, T, K, H))
    # Row 0: two documents; row 1: one. Causal, so key blocks after a query are hidden from it.
    seg = np.stack([np.r_[np.ones(5, int), np.full(T - 5, 2)], np.ones(T, int)])
    mask = np.tril(np.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    return q, k, v, mask[:, None, None]  # mask [B, 1, 1, T, S]


def _numpy(q, k, v, mask, scale, softcap=None, sinks=None):
    """Output [B, T, K, G, H] and log-sum-exp [B, K, G, T] of the whole softmax, in float64."""
    scores = np.einsum("btkgd,bskd->bkgts", q, k) * scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(mask, scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    if sinks is not None:
        top = np.maximum(top, sinks[:, :, None, None])
    weights = np.exp(scores - top)
    total = weights.sum(-1, keepdims=True) + (0 if sinks is None else np.exp(sinks[:, :, None, None] - top))
    out = np.einsum("bkgts,bskd->btkgd", weights / total, v)
    return out, (top + np.log(total))[..., 0]


@pytest.mark.parametrize("softcap,with_sinks", [(None, False), (2.0, False), (None, True)])
def test_folding_key_blocks_in_any_order_is_the_whole_softmax(softcap, with_sinks):
    q, k, v, mask = _inputs()
    sinks = np.array([[0.5, -1.0], [2.0, 0.0]]) if with_sinks else None
    opts = flash.Options(None, H ** -0.5, softcap)
    q_h, k_h, v_h = (flash.heads_major(jnp.asarray(x, jnp.float32)) for x in (q, k, v))
    state = flash.start(q_h)
    # The last block first: rows 0-3 see none of its keys, so their first fold is of hidden scores only.
    for keys in (slice(8, 12), slice(0, 4), slice(4, 8)):
        state = flash.fold(state, q_h, k_h[:, :, keys], v_h[:, :, keys], mask[..., keys], opts)
    out, lse = flash.finish(state, jnp.float32, None if sinks is None else jnp.asarray(sinks, jnp.float32))
    out = flash.tokens_major(out)
    expected_out, expected_lse = _numpy(q, k, v, mask, H ** -0.5, softcap, sinks)
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_block_pair_gradients_sum_to_the_whole_gradient(softcap):
    q, k, v, mask = _inputs(seed=1)
    d_out = np.random.default_rng(2).standard_normal(q.shape)
    opts = flash.Options(None, H ** -0.5, softcap)
    out, lse = _numpy(q, k, v, mask, H ** -0.5, softcap)

    def loss(q, k, v):  # the whole softmax in jax, differentiated by jax: the independent reference
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * H ** -0.5
        scores = scores if softcap is None else softcap * jnp.tanh(scores / softcap)
        probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        return jnp.sum(jnp.einsum("bkgts,bskd->btkgd", probs, v) * d_out)

    expected = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    q_h, k_h, v_h, d_out_h = (flash.heads_major(jnp.asarray(x, jnp.float32)) for x in (q, k, v, d_out))
    lse = jnp.asarray(lse, jnp.float32)
    delta = flash.delta(jnp.asarray(out, jnp.float32), jnp.asarray(d_out, jnp.float32))
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for rows in (slice(0, 6), slice(6, 12)):
        for keys in (slice(0, 6), slice(6, 12)):
            parts = flash.grads(q_h[:, :, :, rows], k_h[:, :, keys], v_h[:, :, keys], mask[..., rows, keys],
                                d_out_h[:, :, :, rows], lse[..., rows], delta[..., rows], opts)
            dq[:, rows] += flash.tokens_major(parts[0])
            dk[:, keys] += flash.tokens_major(parts[1])
            dv[:, keys] += flash.tokens_major(parts[2])
    for ours, theirs in zip((dq, dk, dv), expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_sink_gradient_matches_autodiff():
    q, k, v, mask = _inputs(seed=3)
    sinks = jnp.asarray([[0.5, -1.0], [2.0, 0.0]], jnp.float32)
    d_out = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)

    def loss(sinks):
        scores = jnp.where(mask, jnp.einsum("btkgd,bskd->bkgts", q, k) * H ** -0.5, -jnp.inf)
        sink = jnp.broadcast_to(sinks[None, :, :, None, None], (*scores.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], -1), axis=-1)[..., :-1]
        return jnp.sum(jnp.einsum("bkgts,bskd->btkgd", probs, v) * d_out)

    out, lse = _numpy(q, k, v, mask, H ** -0.5, sinks=np.asarray(sinks, np.float64))
    ours = flash.sink_grad(sinks, jnp.asarray(lse, jnp.float32), flash.delta(jnp.asarray(out, jnp.float32), d_out))
    np.testing.assert_allclose(ours, jax.grad(loss)(sinks), rtol=1e-4, atol=1e-5)
