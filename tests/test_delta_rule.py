"""The gated delta rule (models/delta_rule.py) against a float64 numpy loop over tokens: outputs, final
states, gradients (central differences of the numpy loop), chunk sizes that do and do not divide the length,
packed rows with the state reset at each segment, a carried-in state, and the token-by-token JAX form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_sharded.models import delta_rule

B, T, H, K, V = 2, 37, 3, 8, 6


def reference(q, k, v, g, beta, segment_ids=None, state=None, l2norm=True):
    """The rule in float64, one token at a time; the state restarts from zero where the segment changes."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    if l2norm:
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    q = q / np.sqrt(q.shape[-1])
    out = np.zeros(v.shape)
    finals = np.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]))
    for b in range(q.shape[0]):
        s = np.zeros((q.shape[2], q.shape[3], v.shape[3])) if state is None else np.array(state[b], np.float64)
        for t in range(q.shape[1]):
            if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                s = np.zeros_like(s)
            s = s * np.exp(g[b, t])[:, None, None]
            delta = (v[b, t] - np.einsum("hkv,hk->hv", s, k[b, t])) * beta[b, t][:, None]
            s = s + k[b, t][:, :, None] * delta[:, None, :]
            out[b, t] = np.einsum("hkv,hk->hv", s, q[b, t])
        finals[b] = s
    return out, finals


def inputs(seed, length=T):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, B, length, H, K)).astype(np.float32)
    v = rng.normal(size=(B, length, H, V)).astype(np.float32)
    g = -np.log1p(np.exp(rng.normal(size=(B, length, H)))).astype(np.float32)  # -softplus: decays in (0, 1)
    beta = (1 / (1 + np.exp(-rng.normal(size=(B, length, H))))).astype(np.float32)
    return q, k, v, g, beta


# Row 0 packs segments of 10 and 15 tokens then 12 of padding (segment 0); row 1 is one segment.
SEGMENTS = np.array([[1] * 10 + [2] * 15 + [0] * 12, [1] * T], np.int32)


@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_equals_the_token_loop(chunk, packed):
    args = inputs(0)
    segments = SEGMENTS if packed else None
    out, final = jax.jit(lambda *a: delta_rule.chunked(*a, segments, chunk=chunk))(*args)
    want, want_final = reference(*args, segment_ids=segments)
    np.testing.assert_allclose(out, want, atol=2e-5)
    np.testing.assert_allclose(final, want_final, atol=2e-5)


def test_a_packed_row_equals_its_segments_run_alone():
    q, k, v, g, beta = inputs(1)
    packed, _ = delta_rule.chunked(q, k, v, g, beta, SEGMENTS, chunk=8)
    for start, stop in ((0, 10), (10, 25)):
        alone, _ = delta_rule.chunked(*(x[:1, start:stop] for x in (q, k, v, g, beta)), chunk=8)
        np.testing.assert_allclose(packed[0, start:stop], alone[0], atol=2e-5)


def test_a_carried_in_state_and_the_token_by_token_form():
    args = inputs(2)
    state = np.random.default_rng(3).normal(size=(B, H, K, V)).astype(np.float32)
    want, want_final = reference(*args, state=state)
    out, final = delta_rule.chunked(*args, chunk=16, initial_state_BxHxKxV=jnp.asarray(state))
    np.testing.assert_allclose(out, want, atol=2e-5)
    np.testing.assert_allclose(final, want_final, atol=2e-5)
    # decoding: the prompt's state, then one token per call, equals the whole sequence at once
    prompt, rest = 30, T - 30
    _, s = delta_rule.recurrent(*(x[:, :prompt] for x in args), jnp.asarray(state))
    outs = []
    for t in range(rest):
        o, s = delta_rule.recurrent(*(x[:, prompt + t:prompt + t + 1] for x in args), s)
        outs.append(o)
    np.testing.assert_allclose(np.concatenate(outs, 1), want[:, prompt:], atol=2e-5)
    np.testing.assert_allclose(s, want_final, atol=2e-5)


def test_gradients_equal_central_differences_of_the_token_loop():
    """d/d(eps) of sum(out * w) along a random direction in every input, packed rows included."""
    args = inputs(4, length=21)
    segments = SEGMENTS[:, :21]
    rng = np.random.default_rng(5)
    w = rng.normal(size=(B, 21, H, V))
    direction = [rng.normal(size=x.shape) for x in args]

    def ours(*a):
        return jnp.sum(delta_rule.chunked(*a, segments, chunk=8)[0] * w)

    grads = jax.grad(ours, argnums=tuple(range(5)))(*args)
    analytic = sum(float(np.sum(np.asarray(gr, np.float64) * d)) for gr, d in zip(grads, direction))
    eps = 1e-5

    def theirs(sign):
        shifted = [np.asarray(x, np.float64) + sign * eps * d for x, d in zip(args, direction)]
        return np.sum(reference(*shifted, segment_ids=segments)[0] * w)

    numeric = (theirs(1) - theirs(-1)) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-3 * max(1.0, abs(numeric)), (analytic, numeric)
