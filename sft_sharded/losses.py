"""Masked token losses that return (sum, count), so any split of the batch divides exactly once.

Everything here reduces in float32 and is NaN-free on fully masked input: masked positions are removed
with `jnp.where` (not multiplied by 0), and their labels are replaced by 0 first, so no -100 ever indexes
the vocabulary (`take_along_axis`, in the accuracy check, would wrap it to the logit of token V - 100).
Labels out of range at a *trained* position are refused on the host before the step runs (`Trainer`
checks every batch), and -100 is never a target whatever the mask says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sft_sharded.batch import IGNORE_INDEX
from sft_sharded.models.decoder import head_product, logits as head_logits, softcap
from sft_sharded.parallel.sharding import constrain, logical_shards, sequence_shards


def safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, and 0 (not NaN) when nothing was counted: an all-masked batch has loss 0."""
    return total / jnp.maximum(count, 1.0)


class LossTerms(NamedTuple):
    """Sum of per-token losses and the number of tokens it covers (both float32 scalars), and a term the
    objective has beside the reported loss, in the units of `loss_sum` (a mixture's router losses)."""

    loss_sum: jax.Array
    num_tokens: jax.Array
    penalty: jax.Array | float = 0.0

    def mean(self) -> jax.Array:
        return safe_mean(self.loss_sum, self.num_tokens)


def target_mask(batch: Mapping[str, jax.Array], pad_label_id: int | None = 0) -> jax.Array:
    """Bool [B, T]: which targets count. A -100 label never does. Otherwise an explicit `loss_mask` is
    authoritative (label 0 under a mask of 1 counts); without one, a `pad_label_id` label does not count
    (None turns that rule off). Works on numpy and jax arrays alike.
    """
    labels = batch["labels"]
    mask = labels != IGNORE_INDEX
    if "loss_mask" in batch:
        return mask & (batch["loss_mask"] != 0)
    if pad_label_id is not None:
        mask = mask & (labels != pad_label_id)
    return mask


def target_weights(batch: Mapping[str, jax.Array], pad_label_id: int | None = 0) -> jax.Array:
    """float32 [B, T]: each target's weight in the loss, 0 where `target_mask` says it does not count; a
    float `loss_mask` (per-message weights) gives the weights, a bool one 1.0."""
    mask = target_mask(batch, pad_label_id)
    if "loss_mask" in batch:
        return jnp.where(mask, jnp.asarray(batch["loss_mask"], jnp.float32), 0.0)
    return mask.astype(jnp.float32)


def cross_entropy_with_hits(
    logits_BxTxV: jax.Array, labels_BxT: jax.Array, mask_BxT: jax.Array, z_loss: float = 0.0,
    final_softcap: float | None = None,
) -> tuple[LossTerms, jax.Array]:
    """Token cross entropy (plus optional z-loss, z·logsumexp²) summed over masked-in targets, and the
    number of those targets the model ranks first, from one max over the vocabulary (no separate argmax
    pass over the [B, T, V] logits). A target counts as a hit when its logit equals the maximum, so an
    exact tie counts for every tied token, where argmax would pick the first. A float mask weighs each
    target: sum of weight x loss, sum of weights, and weighted hits, so the mean stays exact. Logits of
    any dtype are soft-capped (`final_softcap`) and reduced in float32."""
    logits = softcap(logits_BxTxV.astype(jnp.float32), final_softcap)
    weights_BxT = jnp.asarray(mask_BxT, jnp.float32)
    mask_BxT = weights_BxT != 0
    safe_labels = jnp.where(mask_BxT, labels_BxT, 0)
    # The max only shifts for stability; stopping its gradient leaves d lse / d logits = softmax exactly.
    max_BxT = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    lse_BxT = max_BxT + jnp.log(jnp.sum(jnp.exp(logits - max_BxT[..., None]), axis=-1))
    # The label's logit by a select-and-sum over the vocabulary, not a gather: it fuses with the other
    # reductions over the converted logits, where a gather needs its operand materialised in float32.
    vocab_BxTxV = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    label_logit_BxT = jnp.sum(jnp.where(vocab_BxTxV == safe_labels[..., None], logits, 0.0), axis=-1)
    per_token_BxT = lse_BxT - label_logit_BxT
    if z_loss:
        per_token_BxT = per_token_BxT + z_loss * jnp.square(lse_BxT)
    loss_sum = jnp.sum(jnp.where(mask_BxT, weights_BxT * per_token_BxT, 0.0))
    hits = jnp.sum(jnp.where(mask_BxT & (label_logit_BxT >= max_BxT), weights_BxT, 0.0))
    return LossTerms(loss_sum, jnp.sum(weights_BxT)), hits


def masked_cross_entropy(
    logits_BxTxV: jax.Array, labels_BxT: jax.Array, mask_BxT: jax.Array, z_loss: float = 0.0
) -> LossTerms:
    """Token cross entropy (plus optional z-loss) summed over masked-in targets, and their count."""
    return cross_entropy_with_hits(logits_BxTxV, labels_BxT, mask_BxT, z_loss)[0]


def token_accuracy(logits_BxTxV: jax.Array, labels_BxT: jax.Array, mask_BxT: jax.Array) -> LossTerms:
    """Number of masked-in targets whose argmax is right, and their count (reuses the (sum, count) pair).
    An independent check of `cross_entropy_with_hits` (the trainer uses that: one pass, not two)."""
    correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == labels_BxT) & mask_BxT
    return LossTerms(jnp.sum(correct_BxT, dtype=jnp.float32), jnp.sum(mask_BxT, dtype=jnp.float32))


def projected_cross_entropy(
    hidden_BxTxD: jax.Array, head_DxV: jax.Array, labels_BxT: jax.Array, mask_BxT: jax.Array,
    z_loss: float = 0.0, final_softcap: float | None = None,
) -> tuple[LossTerms, jax.Array]:
    """`cross_entropy_with_hits` of the whole [B, T, V] logits, projected here from the final hidden states.

    The projection's output stays in the activations' dtype (its products still accumulate in float32)
    and the loss upcasts it, as transformers and MaxText do: the backward pass keeps these logits, and a
    float32 copy would double the step's largest buffer (16 GiB more per chip for Llama 3.1 8B at 8 x 8192
    rows per chip, benchmarks/README.md). `chunked_cross_entropy` does the same one chunk at a time.
    """
    logits_BxTxV = head_logits(hidden_BxTxD, head_DxV, dtype=hidden_BxTxD.dtype)  # soft-capped below, in float32
    return cross_entropy_with_hits(logits_BxTxV, labels_BxT, mask_BxT, z_loss, final_softcap)


def chunked_cross_entropy(
    hidden_BxTxD: jax.Array, head_DxV: jax.Array, labels_BxT: jax.Array, mask_BxT: jax.Array,
    chunk: int, z_loss: float = 0.0, final_softcap: float | None = None,
) -> tuple[LossTerms, jax.Array]:
    """Masked cross entropy and the number of argmax hits, never holding more than [B, chunk, V] logits
    (soft-capped as the model's own logits are when `final_softcap` is set).

    Scans over chunks of the sequence; each chunk's logits are recomputed in the backward pass
    (`jax.checkpoint`), so the [B, T, V] logits of the plain path are never materialised. As there, a
    chunk's logits are in the activations' dtype and reduced in float32: so is the head's gradient that
    each chunk sends over the mesh (a float32 one doubled those bytes: 8 x 3.9 GiB per step for Llama 3.1
    70B on v5p-128, benchmarks/README.md), and the two paths give the same loss. When the
    mesh splits the sequence into S parts, each step takes one chunk of every part ([B, S, chunk]), so the
    scan never crosses devices.
    """
    batch, length, dim = hidden_BxTxD.shape
    if dim <= batch // logical_shards("batch", batch) * chunk:
        # The head is no larger than one chunk's logits: gather it once, not in every chunk of the forward
        # and backward passes, and let each chunk add to a local gradient reduced once after the scan.
        # (Llama 3.1 8B, 8 rows per chip: 125 -> 72 GiB of collectives per step; with few rows per chip
        # and a wide model the gathered head and its gradient would outweigh the logits they save.)
        head_DxV = constrain(head_DxV, (None, "act_vocab"))
    parts = sequence_shards(length)
    pad = -(length // parts) % chunk

    def split(x):  # [B, T, ...] -> [n, B, S, chunk, ...]: the S parts stay where they are
        x = x.reshape(batch, parts, length // parts, *x.shape[2:])
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        x = x.reshape(batch, parts, -1, chunk, *x.shape[3:])
        return constrain(jnp.moveaxis(x, 2, 0), (None, "batch", "length", *([None] * (x.ndim - 3))))

    @jax.checkpoint
    def one(h_BxSxCxD, labels_BxC, mask_BxC):
        logits_BxCxV = head_product(h_BxSxCxD, head_DxV, h_BxSxCxD.dtype)
        terms, hits = cross_entropy_with_hits(logits_BxCxV, labels_BxC, mask_BxC, z_loss, final_softcap)
        return terms.loss_sum, terms.num_tokens, hits

    def body(acc, xs):
        return jax.tree.map(jnp.add, acc, one(*xs)), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, count, hits), _ = jax.lax.scan(body, (zero, zero, zero),
                                              (split(hidden_BxTxD), split(labels_BxT), split(mask_BxT)))
    return LossTerms(loss_sum, count), hits
