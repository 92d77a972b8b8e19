"""Every attention implementation against the reference; the reference against float64 numpy."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_sharded.errors import UserError
from sft_sharded.models import attention as attn
from sft_sharded.parallel.sharding import LOGICAL_AXIS_RULES, make_mesh


def _inputs(batch=2, length=256, heads=4, kv_heads=2, dim=16, dtype=jnp.float32, packed=True, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), dtype)
    segments = None
    if packed:  # even rows: three documents then padding; odd rows: one document
        cuts = [0, length // 3, length // 2 + 5, length - 20, length]
        row0 = np.concatenate([np.full(b - a, i + 1) for i, (a, b) in enumerate(itertools.pairwise(cuts))])
        row0[cuts[-2]:] = 0
        segments = jnp.asarray(np.stack([row0 if i % 2 == 0 else np.ones(length, int) for i in range(batch)]), jnp.int32)
    cotangent = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    return q, k, v, segments, cotangent


def _numpy_attention(q, k, v, segments, window=None, scale=None, softcap=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    _, length, heads, dim = q.shape
    k = np.repeat(k, heads // k.shape[2], axis=2)
    v = np.repeat(v, heads // v.shape[2], axis=2)
    scores = np.einsum("btnd,bsnd->bnts", q, k) * (dim ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    visible = np.tril(np.ones((length, length), bool))
    if window is not None:  # only the last `window` keys, the query's own included
        visible &= ~np.tril(np.ones((length, length), bool), -window)
    visible = visible[None, None]
    if segments is not None:
        seg = np.asarray(segments)
        visible = visible & (seg[:, None, :, None] == seg[:, None, None, :])
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", probs, v)


def _value_and_grads(fn, q, k, v, segments, cotangent, **kwargs):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, segments, **kwargs).astype(jnp.float32) * cotangent)

    out = fn(q, k, v, segments, **kwargs)
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(actual, expected, rtol, atol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("packed", [True, False])
def test_reference_matches_float64_numpy(packed):
    q, k, v, segments, _ = _inputs(length=64, packed=packed)
    out = attn.dot_product_attention(q, k, v, segments)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, segments), rtol=1e-5, atol=1e-5)


def test_reference_sliding_window_matches_float64_numpy():
    q, k, v, segments, _ = _inputs(length=64)
    out = attn.dot_product_attention(q, k, v, segments, window=7)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, segments, window=7), rtol=1e-5, atol=1e-5)


# Gemma's options together: a window, a query_pre_attn_scalar that is not head_dim, a cap that bites.
CAPPED = dict(window=24, scale=0.3, softcap=2.0)


def test_reference_scale_and_softcap_match_float64_numpy():
    q, k, v, segments, _ = _inputs(length=64)
    out = attn.dot_product_attention(q, k, v, segments, **CAPPED)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, segments, **CAPPED), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length,block", [(300, 64), (128, 128)])
def test_blocked_xla_scale_and_softcap_match_reference(length, block):
    """The capped backward (d tanh) and the scale, with a window that skips key blocks."""
    q, k, v, segments, cotangent = _inputs(length=length)

    def blocked(q, k, v, segments):
        batch, length, heads, dim = q.shape
        q5 = q.reshape(batch, length, k.shape[2], heads // k.shape[2], dim)
        return attn.blocked_attention(q5, k, v, segments, None, block, *CAPPED.values()).reshape(q.shape)

    expected = _value_and_grads(attn.dot_product_attention, q, k, v, segments, cotangent, **CAPPED)
    actual = _value_and_grads(jax.jit(blocked), q, k, v, segments, cotangent)
    _assert_close(actual, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("length,block,window", [(300, 64, 100), (256, 128, 1), (256, 128, 300)])
def test_blocked_xla_sliding_window_matches_reference(length, block, window):
    """Windows shorter than a block, of one key, and longer than the sequence; key blocks outside the
    window are skipped, which the gradients of k and v would show if a visible key were dropped."""
    q, k, v, segments, cotangent = _inputs(length=length)

    def blocked(q, k, v, segments):
        batch, length, heads, dim = q.shape
        q5 = q.reshape(batch, length, k.shape[2], heads // k.shape[2], dim)
        return attn.blocked_attention(q5, k, v, segments, None, block, window).reshape(q.shape)

    expected = _value_and_grads(attn.dot_product_attention, q, k, v, segments, cotangent, window=window)
    actual = _value_and_grads(jax.jit(blocked), q, k, v, segments, cotangent)
    _assert_close(actual, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("length,block", [(256, 128), (300, 128), (300, 64), (100, 128)])
@pytest.mark.parametrize("packed", [True, False])
def test_blocked_xla_matches_reference_values_and_grads(length, block, packed):
    """Several blocks, a ragged last block (300 = 2·128 + 44), one block only, packed and unpacked rows."""
    q, k, v, segments, cotangent = _inputs(length=length, packed=packed)

    def blocked(q, k, v, segments):
        batch, length, heads, dim = q.shape
        q5 = q.reshape(batch, length, k.shape[2], heads // k.shape[2], dim)
        return attn.blocked_attention(q5, k, v, segments, None, block).reshape(q.shape)

    expected = _value_and_grads(attn.dot_product_attention, q, k, v, segments, cotangent)
    actual = _value_and_grads(jax.jit(blocked), q, k, v, segments, cotangent)
    _assert_close(actual, expected, rtol=2e-5, atol=2e-5)


def test_blocked_xla_in_bfloat16_stays_close_to_float32_reference():
    q, k, v, segments, cotangent = _inputs(length=256)
    expected = _value_and_grads(attn.dot_product_attention, q, k, v, segments, cotangent)
    as_bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    fn = functools.partial(attn.attention, implementation="xla")
    actual = _value_and_grads(jax.jit(fn), *as_bf16, segments, cotangent)
    _assert_close(actual, expected, rtol=0.05, atol=0.05)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what 'auto' picks on CPU")
def test_auto_resolves_to_xla_on_cpu_and_cudnn_refuses_clearly():
    assert attn.choose_kernel("auto", jnp.bfloat16, 64, 4096) == "xla"
    assert attn.choose_kernel("auto", jnp.bfloat16, 64, 4096, softcap=50.0) == "xla"
    with pytest.raises(ValueError, match="attention='cudnn' needs a GPU.*platform 'cpu'"):
        attn.choose_kernel("cudnn", jnp.bfloat16, 64, 4096)
    with pytest.raises(ValueError, match="must be one of"):
        attn.choose_kernel("flash", jnp.bfloat16, 64, 4096)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("packed,window,scale", [(True, None, None), (False, None, None), (True, 64, 0.1)])
def test_cudnn_matches_reference_on_gpu(packed, window, scale):
    q, k, v, segments, cotangent = _inputs(length=256, dim=64, dtype=jnp.bfloat16, packed=packed)
    expected = _value_and_grads(attn.dot_product_attention, q, k, v, segments, cotangent, window=window, scale=scale)
    fn = functools.partial(attn.attention, implementation="cudnn", window=window, scale=scale)
    actual = _value_and_grads(jax.jit(fn), q, k, v, segments, cotangent)
    _assert_close(actual, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("window", [None, 99])
def test_cudnn_chunk_of_a_split_sequence_matches_the_reference_rows(window):
    """The per-shard cuDNN call of a split sequence (`models/attention/split_fused.py`): queries 128..191 of a row
    against all its keys equal those rows of the reference attention, values and gradients. cuDNN on a GPU
    (benchmarks/gpu_check.sh runs it there, on one GPU); jax's XLA implementation of the same call here."""
    from sft_sharded.models.attention.kernels import cudnn_chunk

    q, k, v, segments, cotangent = _inputs(length=256, dim=64, dtype=jnp.bfloat16, packed=True)
    rows = slice(128, 192)

    def reference(q, k, v, segments):
        return attn.dot_product_attention(q, k, v, segments, window=window)[:, rows]

    def chunk(q, k, v, segments):
        return cudnn_chunk(q[:, rows], k, v, segments[:, rows], segments, rows.start, window, 64 ** -0.5)

    expected = _value_and_grads(reference, q, k, v, segments, cotangent[:, rows])
    _assert_close(_value_and_grads(jax.jit(chunk), q, k, v, segments, cotangent[:, rows]), expected, rtol=0.05,
                  atol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_splash_matches_reference(mesh_shape):
    """Splash in Pallas interpret mode on CPU (the kernel itself on TPU), alone and under a mesh where
    it runs per device in shard_map: batch on data x fsdp, 4 q heads and 2 kv heads on tensor."""
    q, k, v, segments, cotangent = _inputs(batch=4, length=256, packed=True)
    expected = _value_and_grads(attn.dot_product_attention, q, k, v, segments, cotangent)
    fn = jax.jit(functools.partial(attn.attention, implementation="splash"))
    if mesh_shape is None:
        actual = _value_and_grads(fn, q, k, v, segments, cotangent)
    else:
        mesh = make_mesh(*mesh_shape)
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            actual = _value_and_grads(fn, q, k, v, segments, cotangent)
    _assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(window=100), CAPPED], ids=["window", "window-scale-softcap"])
def test_splash_sliding_window_matches_reference(options):
    q, k, v, segments, cotangent = _inputs(length=256 if "softcap" not in options else 128)
    expected = _value_and_grads(attn.dot_product_attention, q, k, v, segments, cotangent, **options)
    fn = jax.jit(functools.partial(attn.attention, implementation="splash", **options))
    _assert_close(_value_and_grads(fn, q, k, v, segments, cotangent), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_splash_without_segment_ids_is_causal_attention(mesh_shape):
    q, k, v, _, cotangent = _inputs(batch=4, length=128, packed=False)
    expected = _value_and_grads(attn.dot_product_attention, q, k, v, None, cotangent)
    fn = jax.jit(functools.partial(attn.attention, implementation="splash"))
    if mesh_shape is None:
        actual = _value_and_grads(fn, q, k, v, None, cotangent)
    else:
        with jax.set_mesh(make_mesh(*mesh_shape)), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            actual = _value_and_grads(fn, q, k, v, None, cotangent)
    _assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_sinks_join_the_denominator_in_the_reference_and_the_blocked_implementation():
    """gpt-oss's sinks: forward of both against float64 numpy (the sink as an extra score column that is
    dropped after the softmax), and the blocked implementation's hand-written gradients (q, k, v and the
    sinks) against autodiff through the reference; with a window, packed segments and a block size that
    does not divide the length."""
    q, k, v, segments, cotangent = _inputs(length=200)
    sinks = jnp.asarray(np.random.default_rng(5).standard_normal(4) * 2, jnp.float32)

    def numpy_sinks(window):
        qf, kf, vf = (np.repeat(np.asarray(x, np.float64), 1 if x is q else 2, axis=2) for x in (q, k, v))
        scores = np.einsum("btnd,bsnd->bnts", qf, kf) * 16 ** -0.5
        visible = np.tril(np.ones((200, 200), bool)) & ~np.tril(np.ones((200, 200), bool), -window)
        seg = np.asarray(segments)
        visible = visible[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
        scores = np.where(visible, scores, -np.inf)
        column = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], scores.shape[:3] + (1,))
        full = np.concatenate([scores, column], axis=-1)
        probs = np.exp(full - full.max(-1, keepdims=True))
        probs = (probs / probs.sum(-1, keepdims=True))[..., :-1]
        return np.einsum("bnts,bsnd->btnd", probs, vf)

    expected = numpy_sinks(48)
    for implementation in ("reference", "xla"):
        out = attn.attention(q, k, v, segments, implementation, window=48, sinks_N=sinks)
        _assert_close(out, expected, rtol=1e-5, atol=1e-5)

    def loss(implementation):
        def f(q, k, v, sinks):
            out = attn.attention(q, k, v, segments, implementation, window=48, sinks_N=sinks)
            return jnp.sum(out * cotangent)
        return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, sinks)

    reference = loss("reference")
    for got, want in zip(loss("xla"), reference):
        _assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(reference[3]).max()) > 1e-2  # the sinks' gradient is not trivially zero
    with pytest.raises(UserError, match="attention sinks .* not by model.attention='splash'"):
        attn.attention(q, k, v, segments, "splash", sinks_N=sinks)
