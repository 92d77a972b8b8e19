"""The order of a row's positions when the mesh splits the sequence (`layout_order`), and the way back to
the natural order for activations (`zigzag_to_natural`): the decoder permutes its inputs into the layout
once and its outputs back once; every other part of the step works position by position."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sft_sharded.parallel.sharding import activation_spec


def layout_order(length: int, shards: int, layout: str = "zigzag") -> np.ndarray | None:
    """The original position of each position of the split layout (None: the natural order). The zigzag
    layout needs 2 x shards chunks; a length without them keeps the natural order (still correct)."""
    if shards == 1 or layout == "contiguous" or length % (2 * shards):
        return None
    chunks = np.arange(length, dtype=np.int32).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])


def chunks(length: int, shards: int, layout: str) -> list[list[tuple[int, int, int]]]:
    """For each device: (first row in its shard, position of that row in the sequence, rows) of each run
    of consecutive positions it holds."""
    order = layout_order(length, shards, layout)
    order = np.arange(length) if order is None else order
    rows, out = length // shards, []
    for device in range(shards):
        own = order[device * rows:(device + 1) * rows]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(own) != 1) + 1])
        ends = np.concatenate([starts[1:], [rows]])
        out.append([(int(a), int(own[a]), int(b - a)) for a, b in zip(starts, ends)])
    return out


def chunk_length(length: int, shards: int, layout: str) -> int:
    return min(n for device in chunks(length, shards, layout) for _, _, n in device)


def zigzag_to_natural(x_BxTxD: jax.Array, logical_axes: tuple[str, ...]) -> jax.Array:
    """Activations from the zigzag layout back to the natural order with four point-to-point transfers of
    half a shard each (a gather by index would replicate the whole [B, T, D] on every device first).
    Device i holds chunks (i, 2c-1-i) and needs (2i, 2i+1): each half goes to one device, and the four
    partial permutations below are the four (half, parity) cases."""
    spec = activation_spec(x_BxTxD.shape, logical_axes)
    axis = spec[1]
    shards = jax.sharding.get_abstract_mesh().shape[axis]
    first = [(i, i // 2) for i in range(shards)]
    second = [(i, (2 * shards - 1 - i) // 2) for i in range(shards)]

    def local(x):
        halves = x.reshape(x.shape[0], 2, x.shape[1] // 2, *x.shape[2:])
        send = functools.partial(jax.lax.ppermute, axis_name=axis)
        to_even = send(halves[:, 0], perm=first[0::2]) + send(halves[:, 1], perm=second[1::2])
        to_odd = send(halves[:, 0], perm=first[1::2]) + send(halves[:, 1], perm=second[0::2])
        return jnp.concatenate([to_even, to_odd], axis=1)

    return jax.shard_map(local, in_specs=spec, out_specs=spec, check_vma=False)(x_BxTxD)
