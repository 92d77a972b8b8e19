"""SFTTrainer: the state's init and the SFT loss. The step, shardings and accumulation live in Trainer."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sft_sharded.config import LoraConfig
from sft_sharded.losses import (LossTerms, chunked_cross_entropy, cross_entropy_with_hits, projected_cross_entropy,
                                target_weights)
from sft_sharded.models import moe, quant
from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.decoder import Decoder
from sft_sharded.models.lora import is_adapter
from sft_sharded.trainers import partition
from sft_sharded.trainers.trainer import Batch, Trainer, TrainState

_MODEL_INPUTS = ("positions", "segment_ids")


class WholeBatch(NamedTuple):
    """What each micro-batch's router losses need from the whole batch (no gradient flows through it)."""

    router: moe.RouterSums
    num_tokens: jax.Array  # the whole batch's target count


class SFTTrainer(Trainer):
    """Supervised fine-tuning with the globally masked mean token cross entropy.

    Loss options: `pad_label_id` (a label treated as padding when a batch has no `loss_mask`; None: off),
    `z_loss` (coefficient of z·logsumexp²), `loss_chunk_size` (sequence positions per chunk of a cross
    entropy that never materialises the [B, T, V] logits; the model must have a `hidden_and_head` method,
    as `Decoder` does). Without chunks, a model with `hidden_and_head` has its logits projected by the loss
    (`losses.projected_cross_entropy`: held in the activations' dtype); any other model's `__call__` gives
    them. Everything else (`mesh`, `grad_accum_steps`, `rules`, `compiler_options`) goes to
    `Trainer`."""

    def __init__(self, model, optimizer, *, pad_label_id: int | None = 0, z_loss: float = 0.0,
                 loss_chunk_size: int | None = None, seed: int = 0, **options):
        super().__init__(model, optimizer, **options)
        self.pad_label_id = pad_label_id
        self.z_loss = z_loss
        self.loss_chunk_size = loss_chunk_size
        if self.lora is not None and self.lora.dropout:
            self.dropout_seed = seed  # LoRA dropout: a different mask each step and micro-batch

    @property
    def _config(self) -> DecoderConfig | None:
        """The decoder's config (None for another flax module: it trains as it is, without LoRA or experts)."""
        return self.model.config if isinstance(self.model, Decoder) else None

    @property
    def vocab_size(self) -> int | None:
        return self._config.vocab_size if self._config is not None else None

    @property
    def lora(self) -> LoraConfig | None:
        """The model's LoRA config, or None (full fine-tuning)."""
        return self._config.lora if self._config is not None else None

    def split_params(self, params):
        """(trainable, frozen) parts of a model's params: with LoRA the adapters and the base (stored in
        `lora.base_dtype`), else (params, None)."""
        if self.lora is None:
            return params, None
        adapters, base = partition.split(params, is_adapter)
        # a quantized base is quantized from bfloat16 by `quantize_frozen`, on its shards
        dtype = jnp.dtype(jnp.bfloat16 if self.lora.base_dtype in quant.QUANTIZED else self.lora.base_dtype)
        return adapters, jax.tree.map(lambda x: x.astype(dtype), base)

    def quantize_frozen(self, frozen):
        """The frozen base with its projection weights quantized (QLoRA: lora.base_dtype int8 or nf4), each
        on its weight's shards; unchanged otherwise. Works on arrays and on abstract (ShapeDtypeStruct)
        trees alike."""
        kind = self.lora.base_dtype if self.lora is not None else None
        if kind not in quant.QUANTIZED or frozen is None:
            return frozen
        shardings = quant.quantized_shardings(frozen, kind)
        fn = jax.jit(lambda f: quant.quantize_tree(f, kind), out_shardings=shardings)
        if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen)):
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                jax.eval_shape(fn, frozen), shardings)
        return fn(frozen)

    def abstract_base(self, key: jax.Array, dummy_input) -> object:
        """The frozen base as it is initialised or loaded, before any quantization (abstract)."""
        return self.abstract_sharded(self._init, key, dummy_input).frozen

    def _init(self, key: jax.Array, dummy_input: jax.Array) -> TrainState:
        params, frozen = self.split_params(self.model.init(key, dummy_input)["params"])
        # Boxed params pass their logical names on to the optimizer state (optax maps over leaves).
        return TrainState(params, self.optimizer.init(params), jnp.zeros((), jnp.int32), frozen)

    def create_train_state(self, key: jax.Array, dummy_input: jax.Array) -> TrainState:
        state = self.init_sharded(self._init, key, dummy_input)
        return state.replace(frozen=self.quantize_frozen(state.frozen))

    def abstract_train_state(self, key: jax.Array, dummy_input) -> TrainState:
        abstract = self.abstract_sharded(self._init, key, dummy_input)
        return abstract.replace(frozen=self.quantize_frozen(abstract.frozen))

    def compute_loss(self, params, batch: Batch) -> jax.Array:
        """The loss with the model's full params (with LoRA: `partition.merge(state.params, state.frozen)`)."""
        terms, _ = self.loss_terms(params, batch)
        return terms.mean()

    @property
    def replicas_accumulate_apart(self) -> bool:
        """Not with experts: jax cannot vmap their grouped matmul (`ragged_dot`) over replicas that share
        the weights, so XLA sums a mixture's gradient over the replicas once per micro-batch."""
        return not (self._config is not None and self._config.num_experts)

    def whole_batch(self, params, batch: Batch, micro_batches: Batch) -> WholeBatch | None:
        """With router losses and micro-batches: the whole batch's router sums and target count, from a
        forward pass over every micro-batch first. The load-balancing loss multiplies two batch means, so
        a micro-batch's share of its gradient needs the whole batch's expert counts (which carry no
        gradient); with them, the micro-batches' penalties add up to the whole batch's exactly."""
        cfg = self._config
        if self.grad_accum_steps == 1 or cfg is None or not cfg.num_experts or not (
                cfg.router_aux_loss_coef or cfg.router_z_loss_coef):
            return None

        def router(mb):
            return self.loss_terms(params, mb)[1]["router"]

        def body(acc, mb):
            return jax.tree.map(jnp.add, acc, router(mb)), None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(router, first))
        sums, _ = jax.lax.scan(body, zeros, micro_batches)
        return WholeBatch(jax.lax.stop_gradient(sums), jnp.sum(target_weights(batch, self.pad_label_id)))

    def loss_terms(self, params, batch: Batch, rng: jax.Array | None = None,
                   whole: WholeBatch | None = None) -> tuple[LossTerms, dict]:
        """Summed token losses and their count; `rng` (training with LoRA dropout) drives the dropout.
        With experts, the extras carry the router's sums ("router": `moe.RouterSums`) and the terms a
        penalty: the router losses in the units of `loss_sum` (times the token count), which the gradient
        includes; given the whole batch's sums (`whole_batch`), this micro-batch's share of its losses."""
        kwargs = {key: batch[key] for key in _MODEL_INPUTS if key in batch}
        if rng is not None:
            kwargs["rngs"] = {"dropout": rng}
        cfg = self._config
        experts = cfg.num_experts if cfg is not None else 0
        if experts:
            kwargs["mutable"] = ["moe"]
        mask_BxT = target_weights(batch, self.pad_label_id)  # per-target weights (0: not trained)
        softcap = cfg.final_softcap if cfg is not None else None
        if self.loss_chunk_size or hasattr(self.model, "hidden_and_head"):  # the model hands over its head
            out = self.model.apply({"params": params}, batch["input_ids"], **kwargs, method="hidden_and_head")
            (hidden_BxTxD, head_DxV), state = out if experts else (out, None)
            with jax.named_scope("loss"):  # the head's product included: the scope names it in a profile
                if self.loss_chunk_size:  # logits per chunk only
                    terms, hits = chunked_cross_entropy(hidden_BxTxD, head_DxV, batch["labels"], mask_BxT,
                                                        self.loss_chunk_size, self.z_loss, softcap)
                else:
                    terms, hits = projected_cross_entropy(hidden_BxTxD, head_DxV, batch["labels"], mask_BxT,
                                                          self.z_loss, softcap)
        else:
            out = self.model.apply({"params": params}, batch["input_ids"], **kwargs)
            logits_BxTxV, state = out if experts else (out, None)
            with jax.named_scope("loss"):
                terms, hits = cross_entropy_with_hits(logits_BxTxV, batch["labels"], mask_BxT, self.z_loss)
        extra = {"num_correct": hits}
        if experts:
            extra["router"] = router = moe.router_sums(state["moe"])
            whole = whole or WholeBatch(router, terms.num_tokens)
            aux, z = moe.router_penalties(router, whole.router, experts)
            terms = terms._replace(
                penalty=whole.num_tokens * (cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z))
        return terms, extra

    def summarize(self, extra: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The router's metrics from the step's summed statistics (the whole global batch)."""
        if "router" not in extra:
            return extra
        rest = {k: v for k, v in extra.items() if k != "router"}
        return {**rest, **moe.router_metrics(extra["router"], self._config.num_experts)}
