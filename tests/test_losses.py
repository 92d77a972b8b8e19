"""Masked cross entropy, z-loss and token accuracy against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import masked_ce

from sft_sharded.losses import cross_entropy_with_hits, masked_cross_entropy, target_mask, token_accuracy


def _case(seed=0, shape=(3, 7), vocab=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*shape, vocab)).astype(np.float32) * 3
    labels = rng.integers(0, vocab, shape).astype(np.int32)
    mask = rng.random(shape) < 0.6
    return logits, labels, mask


def test_sum_and_count_match_numpy():
    logits, labels, mask = _case()
    terms = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    expected_mean, per_token = masked_ce(logits, labels, mask)
    assert float(terms.num_tokens) == mask.sum()
    np.testing.assert_allclose(terms.loss_sum, per_token[mask].sum(), rtol=1e-6)
    np.testing.assert_allclose(terms.mean(), expected_mean, rtol=1e-6)


def test_z_loss_adds_squared_logsumexp():
    logits, labels, mask = _case(1)
    plain = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    with_z = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), z_loss=1e-2)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(with_z.loss_sum - plain.loss_sum, 1e-2 * (lse[mask] ** 2).sum(), rtol=1e-5)


def test_masked_labels_out_of_range_do_not_leak_nan():
    logits, labels, mask = _case(2)
    labels = np.where(mask, labels, -100)
    loss, grad = jax.value_and_grad(lambda lg: masked_cross_entropy(lg, jnp.asarray(labels), jnp.asarray(mask)).loss_sum)(
        jnp.asarray(logits)
    )
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[~mask] == 0)


def test_all_masked_is_zero_not_nan():
    logits, labels, _ = _case(3)
    mask = np.zeros(labels.shape, bool)
    terms = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    assert float(terms.loss_sum) == 0.0 and float(terms.num_tokens) == 0.0 and float(terms.mean()) == 0.0


def test_target_mask_rules():
    labels = np.array([[5, 0, -100, 7]], np.int32)
    assert target_mask({"labels": labels}).tolist() == [[True, False, False, True]]
    assert target_mask({"labels": labels}, pad_label_id=None).tolist() == [[True, True, False, True]]
    explicit = np.array([[0, 1, 0, 1]], np.float32)  # authoritative: label 0 at position 1 counts
    assert np.asarray(target_mask({"labels": labels, "loss_mask": explicit})).tolist() == [[False, True, False, True]]
    ones = np.ones((1, 4), bool)  # ... but -100 is never a target, whatever the mask says
    assert np.asarray(target_mask({"labels": labels, "loss_mask": ones})).tolist() == [[True, True, False, True]]


def test_token_accuracy_counts_argmax_hits_inside_the_mask():
    logits, labels, mask = _case(4)
    hits = (logits.argmax(-1) == labels) & mask
    acc = token_accuracy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    assert float(acc.loss_sum) == hits.sum() and float(acc.num_tokens) == mask.sum()


def test_cross_entropy_with_hits_counts_numpy_argmax_hits_and_gives_the_numpy_loss():
    logits, labels, mask = _case(6)
    terms, hits = cross_entropy_with_hits(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    assert float(hits) == ((logits.argmax(-1) == labels) & mask).sum()
    np.testing.assert_allclose(float(terms.loss_sum), masked_ce(logits, labels, mask)[0] * mask.sum(), rtol=1e-5)


def test_chunked_cross_entropy_matches_the_plain_path_with_gradients():
    from sft_sharded.losses import chunked_cross_entropy

    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 50, (2, 10)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 10)) < 0.7)

    def plain(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        terms = masked_cross_entropy(logits, labels, mask, z_loss=1e-3)
        return terms.loss_sum, token_accuracy(logits, labels, mask).loss_sum

    def chunked(h, w):
        terms, hits = chunked_cross_entropy(h, w, labels, mask, chunk=4, z_loss=1e-3)  # 10 % 4 != 0: padded
        return terms.loss_sum, hits

    (loss_p, hits_p), grads_p = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(hidden, head)
    (loss_c, hits_c), grads_c = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, head)
    np.testing.assert_allclose(loss_c, loss_p, rtol=1e-6)
    assert float(hits_c) == float(hits_p)
    for gc, gp in zip(grads_c, grads_p):
        np.testing.assert_allclose(gc, gp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 4])
def test_projected_cross_entropy_rounds_logits_to_the_activation_dtype_and_soft_caps_in_float32(chunk):
    """bfloat16 hidden states and head: the loss is numpy's float64 cross entropy of the bfloat16-rounded
    logits (soft-capped after rounding), hits included; float32 inputs keep float32 logits. The same for
    the whole logits and the chunked loss (6 positions in chunks of 4: one padded)."""
    from sft_sharded.losses import chunked_cross_entropy, projected_cross_entropy

    def loss(h, w, labels, mask, final_softcap):
        if chunk is None:
            return projected_cross_entropy(h, w, labels, mask, final_softcap=final_softcap)
        return chunked_cross_entropy(h, w, labels, mask, chunk, final_softcap=final_softcap)

    rng = np.random.default_rng(8)
    hidden = rng.normal(size=(2, 6, 8)).astype(np.float32)
    head = rng.normal(size=(8, 40)).astype(np.float32)
    labels = rng.integers(0, 40, (2, 6)).astype(np.int32)
    mask = rng.random((2, 6)) < 0.7
    for dtype, cap in ((jnp.bfloat16, None), (jnp.bfloat16, 5.0), (jnp.float32, None)):
        h, w = jnp.asarray(hidden, dtype), jnp.asarray(head, dtype)
        rounded = np.asarray(jnp.einsum("btd,dv->btv", h, w).astype(jnp.float32), np.float64)
        expected = rounded if cap is None else cap * np.tanh(rounded / cap)
        terms, hits = loss(h, w, jnp.asarray(labels), jnp.asarray(mask), cap)
        np.testing.assert_allclose(float(terms.loss_sum), masked_ce(expected, labels, mask)[0] * mask.sum(), rtol=1e-5)
        assert float(hits) == ((expected.argmax(-1) == labels) & mask).sum()
    exact = np.einsum("btd,dv->btv", hidden.astype(np.float64), head)
    np.testing.assert_allclose(float(terms.loss_sum), masked_ce(exact, labels, mask)[0] * mask.sum(), rtol=1e-5)


@pytest.mark.parametrize("chunk", [8, 4])
def test_chunked_loss_gathers_the_head_once_only_where_it_is_no_larger_than_a_chunk(chunk):
    """8 rows over fsdp=8 (one per device), width 8, 16 positions, the head sharded on its width: chunks
    of 8 positions (8 <= 1 x 8) gather it once for the whole loss and its gradient; chunks of 4 (8 > 1 x 4)
    gather it per chunk. Counted in the compiled program."""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sft_sharded.parallel.hlo_collectives import collectives
    from sft_sharded.losses import chunked_cross_entropy
    from sft_sharded.parallel.sharding import LOGICAL_AXIS_RULES, batch_sharding, make_mesh

    mesh = make_mesh(1, 8, 1)
    hidden = jax.ShapeDtypeStruct((8, 16, 8), jnp.float32, sharding=batch_sharding(mesh, 3))
    head = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    labels, mask = jnp.zeros((8, 16), jnp.int32), jnp.ones((8, 16), bool)

    def loss(h, w):
        return chunked_cross_entropy(h, w, labels, mask, chunk)[0].loss_sum

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, head).compile().as_text()
    gathers = collectives(hlo)["all-gather"]["count"]
    assert gathers == 1 if chunk == 8 else gathers >= 16 // chunk
