"""QLoRA's frozen base: projection weights stored as qwix `QArray`s (int8 with a scale per output channel,
or NF4 with a scale per block of 64 input elements, as QLoRA) on the weights' own shards, and
dequantized per layer in the compute dtype where the model reads them (`layers.weight`).

qwix (Google's JAX quantization library) provides the formats, `quantize` and `dequantize`; we use it as
an array library only. Its `LoraProvider` rewrites a model's dots by interception, which would hide the
adapters from our logical sharding rules and from PEFT export, so the adapters stay ours.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from sft_sharded.choices import PROJECTIONS
from sft_sharded.parallel.sharding import fit_spec, key_name

QUANTIZED = ("int8", "nf4")
NF4_BLOCK = 64
# The projection weights QLoRA quantizes (norms, biases, the embedding and the head stay bfloat16), with
# the axes of their input dimension.
INPUT_AXES = {PROJECTIONS[target][1]: axes for target, axes in
              {"q": (0,), "k": (0,), "v": (0,), "o": (0, 1), "gate": (0,), "up": (0,), "down": (0,)}.items()}
_HEAD_WEIGHTS = {weight for module, weight, _ in PROJECTIONS.values() if module == "attn"}  # [.., heads, head_dim]


def quantize(w: jax.Array, kind: str, input_axes: tuple[int, ...]):
    """A weight as a QArray: scales per output channel (and per layer of a scanned stack); NF4 also splits
    the last input axis that 64 divides into blocks of 64 (else one block per channel)."""
    import qwix

    channel = tuple(a for a in range(w.ndim) if a not in input_axes)
    if kind == "int8":
        return qwix.quantize(w, jnp.int8, channelwise_axes=channel, scale_dtype=jnp.bfloat16)
    tiled = [a for a in input_axes if w.shape[a] % NF4_BLOCK == 0]
    others = tuple(a for a in input_axes if not tiled or a != tiled[-1])
    return qwix.quantize(w, "nf4", channelwise_axes=(*channel, *others),
                         tiled_axes={tiled[-1]: NF4_BLOCK} if tiled else None, scale_dtype=jnp.bfloat16)


def _input_axes(path: tuple, ndim: int) -> tuple[int, ...] | None:
    name = key_name(path[-1])
    if name not in INPUT_AXES:
        return None
    offset = ndim - (3 if name in _HEAD_WEIGHTS else 2)  # a scanned stack adds a layer axis
    return tuple(a + offset for a in INPUT_AXES[name])


def quantize_tree(frozen: Any, kind: str) -> Any:
    """Every projection weight of a frozen base quantized; other leaves as they are."""
    def one(path, x):
        axes = _input_axes(path, x.ndim)
        return x if axes is None else quantize(x, kind, axes)

    return jax.tree_util.tree_map_with_path(one, frozen)


def quantized_shardings(frozen: Any, kind: str) -> Any:
    """Shardings of `quantize_tree(frozen)`: each QArray's values on its weight's sharding, its scales on
    the same axes where they divide (a dimension of 1 is replicated)."""
    def one(path, x):
        axes = _input_axes(path, x.ndim)
        if axes is None:
            return x.sharding
        quantized = jax.eval_shape(lambda w: quantize(w, kind, axes), x)
        sh = x.sharding
        return jax.tree.map(lambda part: NamedSharding(sh.mesh, fit_spec(sh.spec, part.shape, sh.mesh)), quantized)

    return jax.tree_util.tree_map_with_path(one, frozen)


def dequantize(value: Any) -> jax.Array:
    """A stored weight as an array: QArrays are dequantized, arrays pass through (without importing qwix,
    which only quantized training needs)."""
    if isinstance(value, jax.Array):
        return value
    import qwix

    return qwix.dequantize(value) if isinstance(value, qwix.QArray) else value
