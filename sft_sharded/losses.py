"""Masked token losses that return (sum, count), so any split of the batch divides exactly once.

Everything here is float32 and NaN-free on fully masked input: masked positions are removed with
`jnp.where` (not multiplied by 0), and their labels are replaced by 0 before the gather, because an
out-of-range label such as -100 would otherwise read NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


class LossTerms(NamedTuple):
    """Sum of per-token losses and the number of tokens it covers (both float32 scalars)."""

    loss_sum: jax.Array
    num_tokens: jax.Array

    def mean(self) -> jax.Array:
        return self.loss_sum / jnp.maximum(self.num_tokens, 1.0)


def target_mask(batch: Mapping[str, jax.Array], pad_label_id: int | None = 0) -> jax.Array:
    """Bool [B, T]: which targets count. An explicit `loss_mask` is authoritative (DESIGN.md §4).

    Without it a target counts unless it is -100 or `pad_label_id` (None turns the pad rule off).
    """
    if "loss_mask" in batch:
        mask = batch["loss_mask"]
        return mask if mask.dtype == jnp.bool_ else mask != 0
    labels = batch["labels"]
    mask = labels != IGNORE_INDEX
    if pad_label_id is not None:
        mask = mask & (labels != pad_label_id)
    return mask


def masked_cross_entropy(
    logits_BxTxV: jax.Array, labels_BxT: jax.Array, mask_BxT: jax.Array, z_loss: float = 0.0
) -> LossTerms:
    """Token cross entropy (plus optional z-loss, z·logsumexp²) summed over masked-in targets."""
    logits = logits_BxTxV.astype(jnp.float32)
    safe_labels = jnp.where(mask_BxT, labels_BxT, 0)
    per_token_BxT = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    if z_loss:
        per_token_BxT = per_token_BxT + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
    loss_sum = jnp.sum(jnp.where(mask_BxT, per_token_BxT, 0.0))
    return LossTerms(loss_sum, jnp.sum(mask_BxT, dtype=jnp.float32))


def token_accuracy(logits_BxTxV: jax.Array, labels_BxT: jax.Array, mask_BxT: jax.Array) -> LossTerms:
    """Number of masked-in targets whose argmax is right, and their count (reuses the (sum, count) pair)."""
    correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == labels_BxT) & mask_BxT
    return LossTerms(jnp.sum(correct_BxT, dtype=jnp.float32), jnp.sum(mask_BxT, dtype=jnp.float32))


def chunked_cross_entropy(
    hidden_BxTxD: jax.Array, head_DxV: jax.Array, labels_BxT: jax.Array, mask_BxT: jax.Array,
    chunk: int, z_loss: float = 0.0,
) -> tuple[LossTerms, jax.Array]:
    """Masked cross entropy and the number of argmax hits, never holding more than [B, chunk, V] logits.

    Scans over chunks of the sequence; each chunk's logits are recomputed in the backward pass
    (`jax.checkpoint`), so the float32 [B, T, V] logits of the plain path are never materialised.
    """
    batch, length, dim = hidden_BxTxD.shape
    pad = -length % chunk
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        labels_BxT = jnp.pad(labels_BxT, ((0, 0), (0, pad)))
        mask_BxT = jnp.pad(mask_BxT, ((0, 0), (0, pad)))
    n = (length + pad) // chunk

    def split(x):  # [B, T, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(h_BxCxD, labels_BxC, mask_BxC):
        logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, head_DxV, preferred_element_type=jnp.float32)
        terms = masked_cross_entropy(logits_BxCxV, labels_BxC, mask_BxC, z_loss)
        hits = token_accuracy(logits_BxCxV, labels_BxC, mask_BxC).loss_sum
        return terms.loss_sum, terms.num_tokens, hits

    def body(acc, xs):
        return jax.tree.map(jnp.add, acc, one(*xs)), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, count, hits), _ = jax.lax.scan(body, (zero, zero, zero),
                                              (split(hidden_BxTxD), split(labels_BxT), split(mask_BxT)))
    return LossTerms(loss_sum, count), hits
