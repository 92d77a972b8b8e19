"""Packing: best fit, conservation (property test), segment boundaries, and the model honouring segments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

from sft_sharded import Decoder, SFTTrainer, make_mesh
from sft_sharded.data.formats import Example
from sft_sharded.data.packing import best_fit_decreasing, efficiency, pack, pad, unpack


def _example(rng, n):
    tokens = rng.integers(1, 60, n).astype(np.int32)
    mask = rng.random(n) < 0.7
    mask[0] = False
    return Example(tokens, mask)


def test_best_fit_decreasing_fills_tightly():
    bins = best_fit_decreasing([5, 4, 3, 3, 2, 2, 1], capacity=10)
    sizes = sorted(sum([5, 4, 3, 3, 2, 2, 1][i] for i in b) for b in bins)
    assert sizes == [10, 10]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 17), min_size=1, max_size=30), st.integers(0, 10_000))
def test_unpacking_gives_back_exactly_the_examples(lengths, seed):
    rng = np.random.default_rng(seed)
    examples = [_example(rng, n) for n in lengths]
    rows = pack(examples, max_length=16)
    got = sorted((tuple(t.tolist()), tuple(m.tolist())) for row in rows for t, m in unpack(row))
    want = sorted((tuple(e.tokens.tolist()), tuple(e.mask.tolist())) for e in examples)
    assert got == want
    for row in rows:
        seg = row["segment_ids"]
        assert not row["loss_mask"][seg == 0].any()  # padding is never trained
        starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
        for s in starts:
            if seg[s] > 0:
                assert row["positions"][s] == 0  # each segment restarts its positions
    real = sum(len(e.tokens) - 1 for e in examples)
    assert abs(efficiency(rows) - real / (16 * len(rows))) < 1e-9


def test_no_target_crosses_a_segment_boundary():
    rng = np.random.default_rng(0)
    a, b = _example(rng, 6), _example(rng, 5)
    row = pack([a, b], 16)[0]
    assert row["segment_ids"].tolist() == [1] * 5 + [2] * 4 + [0] * 7
    # the last target of segment 1 is a's last token, not b's first: segment 2 opens on b's first token
    assert row["labels"][4] == a.tokens[-1] and row["input_ids"][5] == b.tokens[0]
    assert row["labels"][5:9].tolist() == b.tokens[1:].tolist()


def test_packed_batch_trains_to_the_same_loss_as_the_padded_batch(tiny_config):
    rng = np.random.default_rng(1)
    examples = [_example(rng, n) for n in (9, 7, 5, 12, 4, 3, 8, 6)]
    packed_rows = pack(examples, 16)
    padded_rows = [pad(e, 16) for e in examples]
    trainer = SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=make_mesh(1, 8, 1))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))

    def batch(rows):
        rows = rows + [pad(Example(np.array([1, 1], np.int32), np.array([False, False])), 16)] * (-len(rows) % 8)
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    packed, padded = batch(packed_rows), batch(padded_rows)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0] or len(packed_rows) < len(padded_rows)
    loss_packed, grads_packed = trainer.loss_and_grad(state.params, packed)
    loss_padded, grads_padded = trainer.loss_and_grad(state.params, padded)
    np.testing.assert_allclose(loss_packed, loss_padded, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), grads_packed, grads_padded)
    # and without segment ids the packed loss differs: the check above is not vacuous
    leaky = {k: v for k, v in packed.items() if k != "segment_ids"}
    assert abs(float(trainer.loss_and_grad(state.params, leaky)[0]) - float(loss_padded)) > 1e-4
