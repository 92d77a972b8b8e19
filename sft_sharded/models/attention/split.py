"""Attention over a sequence split between devices (the mesh axis that the logical name "length" maps to:
`context`), honouring causality, packed segments that cross shard boundaries and sliding windows.

Two schemes, each made of `flash`'s forward and backward (the probabilities are recomputed from the saved
log-sum-exp, never stored), the same as the local "xla" kernel's:

- "allgather": every device gathers the whole row's keys and values (K/V are N/K times smaller than the
  queries) and attends its own queries to them; the backward pass reduce-scatters their gradients.
- "ring": key/value blocks travel around the ring of the context axis, one hop per step, while each device
  folds the block it holds into a running log-sum-exp; the next block's hop is issued before the current
  block's compute so the two can overlap. The backward pass sends the keys' gradients around with them.

Layout: with `zigzag` (the default) the row is cut into 2c chunks and device i holds chunks i and 2c-1-i,
so each device's queries see the same number of earlier keys (causal load balance). The decoder
permutes its inputs into this layout and its outputs back (`layout_order`); every other part of the step
works position by position and does not care. Key blocks and query blocks that the causal mask or the
window hide entirely are skipped, which is what makes the layout matter.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sft_sharded.models.attention import flash, split_fused
from sft_sharded.models.attention.choose import Split, choose_kernel
from sft_sharded.models.attention.layout import layout_order
from sft_sharded.models.attention.masking import positions_mask
from sft_sharded.parallel.sharding import activation_spec, sequence_shards

_BLOCK = 512  # query and key rows per block: [B, K, G, 512, 512] float32 scores at a time


def _block(n: int) -> int:
    """The largest divisor of n up to _BLOCK (blocks must tile the rows exactly)."""
    return max(d for d in range(1, min(n, _BLOCK) + 1) if n % d == 0)


def _pieces(order: np.ndarray | None, length: int, shards: int) -> int:
    """Rows per block such that every block of a shard covers consecutive original positions (so the
    cheap first/last test of `_any_visible` is exact): a zigzag shard is two runs, a contiguous one is one."""
    run = length // shards if order is None else length // (2 * shards)
    return _block(run)


def _any_visible(q_ord, k_ord, window):
    """Whether any key of a block can be visible to any query of a block (their positions are runs): the
    block's first key is not after its last query, and its last key is inside its first query's window."""
    ok = k_ord[0] <= q_ord[-1]
    return ok if window is None else ok & (k_ord[-1] > q_ord[0] - window)


def _split(x, block, axis=1):
    """[..., S, ...] (S at `axis`) -> [S/block, ..., block, ...] (the scan axis first)."""
    shape = x.shape
    x = x.reshape(*shape[:axis], shape[axis] // block, block, *shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _fold(carry: flash.Running, q, k, v, q_seg, k_seg, q_ord, k_ord, opts, qb, kb) -> flash.Running:
    """Fold keys/values [b, K, S, H] into the running state of queries [b, K, G, C, H], one block pair at a
    time, skipping pairs that no query of the block can see."""
    keys = (_split(k, kb, axis=2), _split(v, kb, axis=2), _split(k_seg, kb), k_ord.reshape(-1, kb))
    states = []
    for start in range(0, q.shape[3], qb):
        rows = slice(start, start + qb)
        q_i, qs_i, qo_i = q[:, :, :, rows], q_seg[:, rows], q_ord[rows]

        def step(state, xs, q_i=q_i, qs_i=qs_i, qo_i=qo_i):
            k_j, v_j, ks_j, ko_j = xs

            def update(state):
                return flash.fold(state, q_i, k_j, v_j, positions_mask(qo_i, ko_j, qs_i, ks_j, opts.window), opts)

            return jax.lax.cond(_any_visible(qo_i, ko_j, opts.window), update, lambda s: s, state), None

        block_state = flash.Running(carry.accumulator[..., rows, :], carry.maximum[..., rows], carry.total[..., rows])
        states.append(jax.lax.scan(step, block_state, keys)[0])
    return flash.Running(*(jnp.concatenate(parts, axis) for parts, axis in zip(zip(*states), (-2, -1, -1))))


def _unfold(dq, q, k, v, q_seg, k_seg, q_ord, k_ord, lse, delta, d_out, opts, qb, kb):
    """The backward of `_fold` for one key/value block: (dq + its share, dk, dv), all float32. The keys'
    gradients pass through every query block's scan as its per-block input and output, so one buffer is
    updated in place; summing a gradient per query block kept them all alive (a whole row's keys each)."""
    keys = (_split(k, kb, axis=2), _split(v, kb, axis=2), _split(k_seg, kb), k_ord.reshape(-1, kb))
    d_keys = (jnp.zeros(keys[0].shape, jnp.float32), jnp.zeros(keys[1].shape, jnp.float32))
    dqs = []
    for start in range(0, q.shape[3], qb):
        rows = slice(start, start + qb)
        q_i, qs_i, qo_i, do_i = q[:, :, :, rows], q_seg[:, rows], q_ord[rows], d_out[:, :, :, rows]
        lse_i, delta_i = lse[..., rows], delta[..., rows]

        def step(dq_i, xs, q_i=q_i, qs_i=qs_i, qo_i=qo_i, do_i=do_i, lse_i=lse_i, delta_i=delta_i):
            k_j, v_j, ks_j, ko_j, dk_j, dv_j = xs

            def add(dq_i):
                mask = positions_mask(qo_i, ko_j, qs_i, ks_j, opts.window)
                dq_add, dk_add, dv_add = flash.grads(q_i, k_j, v_j, mask, do_i, lse_i, delta_i, opts)
                return dq_i + dq_add, (dk_j + dk_add, dv_j + dv_add)

            return jax.lax.cond(_any_visible(qo_i, ko_j, opts.window), add, lambda dq_i: (dq_i, (dk_j, dv_j)), dq_i)

        dq_i, d_keys = jax.lax.scan(step, dq[:, :, :, rows], (*keys, *d_keys))
        dqs.append(dq_i)
    dk, dv = (jnp.moveaxis(d, 0, 2).reshape(x.shape) for d, x in zip(d_keys, (k, v)))
    return jnp.concatenate(dqs, 3), dk, dv


class _Setup(NamedTuple):
    """What a split-sequence attention call fixes at trace time (hashable: the custom VJP's static part)."""

    scheme: str
    layout: str
    axis: str  # the mesh axis that splits the sequence
    shards: int
    opts: flash.Options
    run: int  # rows per query and key block
    q_spec: P
    kv_spec: P

    def order(self, length: int) -> jax.Array:
        order = layout_order(length, self.shards, self.layout)
        return jnp.arange(length, dtype=jnp.int32) if order is None else jnp.asarray(order)

    def own(self, order: jax.Array, rows: int) -> jax.Array:
        """This device's positions of the layout."""
        return jax.lax.dynamic_slice_in_dim(order, jax.lax.axis_index(self.axis) * rows, rows)

    def hop(self, x):
        """Every device's block to the next device of the ring."""
        return jax.lax.ppermute(x, self.axis, [(i, (i + 1) % self.shards) for i in range(self.shards)])

    def gather(self, x, axis: int = 1):
        """Every device's part of `x`'s sequence axis (1 for segment ids, 2 for heads-major keys)."""
        return jax.lax.all_gather(x, self.axis, axis=axis, tiled=True)

    def shard_map(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    @property
    def stat_spec(self) -> P:  # [b, K, G, C] float32: a query's log-sum-exp
        return P(self.kv_spec[0], self.kv_spec[2], None, self.axis)


def _tie(q, seg, order):
    """Make the masks' inputs (segment ids, positions) depend on the queries. They are the same in every
    layer, so inside a scan over layers jax hoisted the masks out of the loop as loop-invariant values and
    kept every block's mask and scores for all layers at once (gigabytes at long context)."""
    return jax.lax.optimization_barrier((q, seg, order))


# The custom VJP wraps the shard_maps: forward and backward are each one shard_map with their collectives
# written out (the backward reduce-scatters what the forward all-gathered).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _split_attention(q, k, v, seg, setup: _Setup):
    return _split_fwd(q, k, v, seg, setup)[0]


def _split_fwd(q, k, v, seg, setup: _Setup):
    order = setup.order(q.shape[1])

    def local(q, k, v, seg):
        b, c, n, h = q.shape
        q, seg, positions = _tie(flash.heads_major(q.reshape(b, c, k.shape[2], n // k.shape[2], h)), seg, order)
        k, v = flash.heads_major(k), flash.heads_major(v)
        own, carry = setup.own(positions, c), flash.start(q)
        args = (setup.opts, setup.run, setup.run)
        if setup.scheme == "ring":
            block = (k, v, seg, own)
            for step in range(setup.shards):
                # The next block's hop does not depend on this step's compute: XLA may overlap them.
                following = setup.hop(block) if step < setup.shards - 1 else None
                carry = _fold(carry, q, block[0], block[1], seg, block[2], own, block[3], *args)
                block = following
        else:
            carry = _fold(carry, q, setup.gather(k, 2), setup.gather(v, 2), seg, setup.gather(seg), own, positions,
                          *args)
        out, lse = flash.finish(carry, q.dtype)
        return flash.tokens_major(out).reshape(b, c, n, h), lse

    seg_spec = P(setup.q_spec[0], setup.axis)
    out, lse = setup.shard_map(local, (setup.q_spec, setup.kv_spec, setup.kv_spec, seg_spec),
                               (setup.q_spec, setup.stat_spec))(q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _split_bwd(setup: _Setup, residuals, d_out):
    q, k, v, seg, out, lse = residuals
    order = setup.order(q.shape[1])

    def local(q, k, v, seg, out, lse, d_out):
        b, c, n, h = q.shape
        grouped = (b, c, k.shape[2], n // k.shape[2], h)
        q, seg, positions = _tie(flash.heads_major(q.reshape(grouped)), seg, order)
        delta = flash.delta(out.reshape(grouped), d_out.reshape(grouped))
        d_out, k, v = (flash.heads_major(x) for x in (d_out.reshape(grouped), k, v))
        own, dq = setup.own(positions, c), jnp.zeros(q.shape, jnp.float32)
        args = (lse, delta, d_out, setup.opts, setup.run, setup.run)
        if setup.scheme == "ring":
            block = (k, v, seg, own)
            d_kv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
            for step in range(setup.shards):
                following = setup.hop(block) if step < setup.shards - 1 else None
                dq, dk, dv = _unfold(dq, q, block[0], block[1], seg, block[2], own, block[3], *args)
                # A block's gradient travels with it; after the last hop it is back with its owner.
                d_kv = setup.hop((d_kv[0] + dk, d_kv[1] + dv))
                block = following
            dk, dv = d_kv
        else:
            dq, dk, dv = _unfold(dq, q, setup.gather(k, 2), setup.gather(v, 2), seg, setup.gather(seg), own,
                                 positions, *args)
            dk, dv = (jax.lax.psum_scatter(x, setup.axis, scatter_dimension=2, tiled=True) for x in (dk, dv))
        dq, dk, dv = (flash.tokens_major(x) for x in (dq, dk, dv))
        return dq.reshape(b, c, n, h).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    seg_spec = P(setup.q_spec[0], setup.axis)
    specs = (setup.q_spec, setup.kv_spec, setup.kv_spec, seg_spec, setup.q_spec, setup.stat_spec, setup.q_spec)
    dq, dk, dv = setup.shard_map(local, specs, (setup.q_spec, setup.kv_spec, setup.kv_spec))(
        q, k, v, seg, out, lse, d_out)
    return dq, dk, dv, None


_split_attention.defvjp(_split_fwd, _split_bwd)


def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window: int | None, scale: float,
              softcap: float | None, scheme: str, layout: str = "zigzag", implementation: str = "auto") -> jax.Array:
    """Causal attention of a sequence split on the mesh (called by `attention.attention` when the mesh
    splits "length"), with its positions in `layout_order`. Output [B, T, N, H], split like the queries.
    The per-shard kernel: splash or cuDNN with the all-gather scheme where `choose_kernel` says, else jax's."""
    batch, length = q_BxTxNxH.shape[:2]
    shards = sequence_shards(length)
    kernel = choose_kernel(implementation, q_BxTxNxH.dtype, q_BxTxNxH.shape[-1], length, softcap,
                           split=Split(scheme, shards, layout))
    q_spec = activation_spec(q_BxTxNxH.shape, ("batch", "length", "act_heads", None))
    kv_spec = activation_spec(k_BxTxKxH.shape, ("batch", "length", "act_kv_heads", None))
    if q_spec[2] != kv_spec[2]:  # kv heads too few to split: keep every head whole so groups line up
        q_spec, kv_spec = P(*q_spec[:2], None, None), P(*kv_spec[:2], None, None)
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((batch, length), jnp.int32)
    if kernel != "jax":
        return split_fused.attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window, float(scale),
                                     softcap, layout, q_spec, kv_spec, shards, kernel)
    run = _pieces(layout_order(length, shards, layout), length, shards)
    opts = flash.Options(window, float(scale), softcap)
    setup = _Setup(scheme, layout, q_spec[1], shards, opts, run, q_spec, kv_spec)
    return _split_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, setup)
