"""The short causal convolution (models/causal_conv.py) against a numpy loop, against torch's conv1d as
transformers calls it, with packed rows cut at segment boundaries, and split into decoding calls."""

import numpy as np
from optional import optional

from sft_sharded.models.causal_conv import causal_conv

B, T, C, K = 2, 13, 5, 4


def reference(x, w, segment_ids=None):
    out = np.zeros(x.shape)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for k in range(w.shape[1]):
                s = t + k - (w.shape[1] - 1)  # transformers: w[:, K-1] meets x_t, w[:, 0] meets x_{t-K+1}
                boundary = segment_ids is not None and any(
                    segment_ids[b, u] != segment_ids[b, u - 1] for u in range(max(s, 0) + 1, t + 1))
                if s >= 0 and not boundary:
                    out[b, t] += w[:, k] * x[b, s]
    return out


def data(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, T, C)).astype(np.float32), rng.normal(size=(C, K)).astype(np.float32)


def test_equals_the_loop_with_and_without_segments():
    x, w = data(0)
    segments = np.array([[1] * 6 + [2] * 4 + [0] * 3, [3] * T], np.int32)
    np.testing.assert_allclose(causal_conv(x, w)[0], reference(x, w), atol=1e-5)
    np.testing.assert_allclose(causal_conv(x, w, segments)[0], reference(x, w, segments), atol=1e-5)


def test_orientation_is_transformers_conv1d():
    torch = optional("torch")
    x, w = data(1)
    theirs = torch.nn.functional.conv1d(torch.tensor(x).transpose(1, 2), torch.tensor(w)[:, None], padding=K - 1,
                                        groups=C)[:, :, :T].transpose(1, 2).numpy()
    np.testing.assert_allclose(causal_conv(x, w)[0], theirs, atol=1e-5)


def test_decoding_calls_carry_the_last_inputs():
    x, w = data(2)
    whole, _ = causal_conv(x, w)
    out, state = causal_conv(x[:, :7], w)
    pieces = [out]
    for t in range(7, T):
        out, state = causal_conv(x[:, t:t + 1], w, state_BxKm1xC=state)
        pieces.append(out)
    np.testing.assert_allclose(np.concatenate(pieces, 1), whole, atol=1e-5)
    np.testing.assert_array_equal(state, x[:, -(K - 1):])
