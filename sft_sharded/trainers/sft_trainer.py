"""SFTTrainer: the seed's methods, nothing else. The step, shardings and accumulation live in Trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sft_sharded.losses import LossTerms, masked_cross_entropy, target_mask, token_accuracy
from sft_sharded.trainers.trainer import Batch, Trainer, TrainState

_MODEL_INPUTS = ("positions", "segment_ids")


class SFTTrainer(Trainer):
    """Supervised fine-tuning with the globally masked mean token cross entropy (DESIGN.md §3, §4)."""

    def __init__(self, model, optimizer, **options):
        super().__init__(model, optimizer, **options)

    def create_train_state(self, key: jax.Array, dummy_input: jax.Array) -> TrainState:
        def init(key, dummy_input):
            params = self.model.init(key, dummy_input)["params"]
            # Boxed params pass their logical names on to the optimizer state (optax maps over leaves).
            return TrainState(params, self.optimizer.init(params), step=jnp.zeros((), jnp.int32))

        return self.init_sharded(init, key, dummy_input)

    def compute_loss(self, params, batch: Batch) -> jax.Array:
        terms, _ = self.loss_terms(params, batch)
        return terms.mean()

    def loss_terms(self, params, batch: Batch) -> tuple[LossTerms, dict[str, jax.Array]]:
        kwargs = {key: batch[key] for key in _MODEL_INPUTS if key in batch}
        logits_BxTxV = self.model.apply({"params": params}, batch["input_ids"], **kwargs)
        mask_BxT = target_mask(batch, self.pad_label_id)
        terms = masked_cross_entropy(logits_BxTxV, batch["labels"], mask_BxT, self.z_loss)
        correct = token_accuracy(logits_BxTxV, batch["labels"], mask_BxT)
        return terms, {"num_correct": correct.loss_sum}
