"""The facts every attention implementation shares (`models/attention/masking.py`), against numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_sharded.models.attention.masking import apply_softcap, attention_mask, scale_of, visible


@pytest.mark.parametrize("window", [None, 1, 3])
def test_visible_is_causal_inside_the_window(window):
    q, k = np.arange(6)[:, None], np.arange(6)[None, :]
    expected = [[s <= t and (window is None or s > t - window) for s in range(6)] for t in range(6)]
    np.testing.assert_array_equal(np.asarray(visible(q, k, window)), expected)


def test_attention_mask_keeps_segments_apart_and_honours_the_offset():
    seg_q = np.array([[1, 1, 2, 0]])
    seg_k = np.array([[1, 1, 1, 1, 2, 0]])
    mask = np.asarray(attention_mask(4, 6, 2, seg_q, seg_k, window=3))[0, 0, 0]
    for t in range(4):
        for s in range(6):
            expected = s <= t + 2 and s > t + 2 - 3 and seg_q[0, t] == seg_k[0, s]
            assert mask[t, s] == expected, (t, s)


def test_softcap_and_its_derivative():
    x = jnp.linspace(-200.0, 200.0, 41)
    capped, d_cap = apply_softcap(x, 50.0)
    np.testing.assert_allclose(capped, 50.0 * np.tanh(np.asarray(x) / 50.0), rtol=1e-6)
    np.testing.assert_allclose(d_cap, jax.vmap(jax.grad(lambda v: 50.0 * jnp.tanh(v / 50.0)))(x), rtol=1e-5, atol=1e-6)
    assert apply_softcap(x, None)[0] is x and apply_softcap(x, None)[1] is None
    assert scale_of(None, 64) == np.float32(0.125) and scale_of(0.5, 64) == np.float32(0.5)
