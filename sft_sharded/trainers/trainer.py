"""TrainState and the Trainer base class: shardings, the jitted train/eval steps, gradient accumulation.

A subclass says how to build the state and what the loss is; everything that touches the mesh lives
here. The step differentiates the *summed* loss of every micro-batch and divides by the global token
count once, so any mesh and any `grad_accum_steps` give the token-weighted mean over the whole batch.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sft_sharded import sharding
from sft_sharded.errors import UserError
from sft_sharded.losses import IGNORE_INDEX, LossTerms

Batch = Mapping[str, Any]
BATCH_KEYS = ("input_ids", "labels", "loss_mask", "segment_ids", "positions")
# XLA:CPU's YNNPACK fusions (a dot fused with its elementwise neighbours) run this model's steps up to
# 1.7x slower than plain dots plus loop fusions on the machines we measured (benchmarks/README.md), so
# the steps compile without them on CPU. Other platforms get no options.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array


class Trainer(abc.ABC):
    """Base trainer. Options: `mesh` (default: every device on "fsdp"), `grad_accum_steps`,
    `pad_label_id` (label id treated as padding when a batch has no `loss_mask`; None: off), `z_loss`,
    `loss_chunk_size` (sequence positions per chunk of a cross entropy that never materialises the
    [B, T, V] logits; the model must accept `return_hidden=True`, as `Llama` does), `rules` (logical
    axis rules; default `sharding.LOGICAL_AXIS_RULES`), `compiler_options` (XLA options for the
    compiled steps; default `CPU_COMPILER_OPTIONS` on CPU meshes, none elsewhere)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: optax.GradientTransformation,
        *,
        mesh: jax.sharding.Mesh | None = None,
        grad_accum_steps: int = 1,
        pad_label_id: int | None = 0,
        z_loss: float = 0.0,
        loss_chunk_size: int | None = None,
        rules=sharding.LOGICAL_AXIS_RULES,
        compiler_options: dict[str, Any] | None = None,
    ):
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={grad_accum_steps!r} must be an int >= 1")
        self.model = model
        self.optimizer = optimizer
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.grad_accum_steps = grad_accum_steps
        self.pad_label_id = pad_label_id
        self.z_loss = z_loss
        self.loss_chunk_size = loss_chunk_size  # tokens per chunk of a chunked cross entropy (None: plain)
        self.rules = rules
        if compiler_options is None:
            on_cpu = self.mesh.devices.flat[0].platform == "cpu"
            compiler_options = dict(CPU_COMPILER_OPTIONS) if on_cpu else {}
        self.compiler_options = compiler_options
        self.state_shardings: Any = None  # set by abstract_sharded (create/abstract_train_state)
        self.abstract_state: Any = None  # ShapeDtypeStructs with shardings, e.g. a checkpoint restore target
        self._jitted: dict[str, Callable] = {}
        self._checked_signatures: set = set()

    # --- what a subclass provides -------------------------------------------------------------------
    @abc.abstractmethod
    def create_train_state(self, key: jax.Array, dummy_input: jax.Array) -> TrainState:
        """Sharded TrainState(params, opt_state, step=0); implementations call `init_sharded`."""

    @abc.abstractmethod
    def compute_loss(self, params: Any, batch: Batch) -> jax.Array:
        """Scalar float32 loss of the batch."""

    def loss_terms(self, params: Any, batch: Batch) -> tuple[LossTerms, dict[str, jax.Array]]:
        """(loss sum, weight) and extra metric sums. Default: the mean with weight 1, so micro-batches
        count equally; SFTTrainer overrides it with per-token sums for exact token weighting."""
        return LossTerms(self.compute_loss(params, batch), jnp.float32(1.0)), {}

    # --- mesh context and sharded init --------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self):
        """The mesh and logical rules that model code (and its sharding constraints) trace under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def abstract_train_state(self, key: jax.Array, dummy_input: Any) -> TrainState:
        """What `create_train_state` would return, as ShapeDtypeStructs with shardings: nothing is
        allocated (a restore target, an AOT plan's input, the shapes for an import)."""
        raise NotImplementedError(f"{type(self).__name__} does not provide abstract_train_state")

    def abstract_sharded(self, init_fn: Callable[[jax.Array, jax.Array], Any], key: jax.Array, dummy_input) -> Any:
        """Shapes of `init_fn(key, dummy_input)` (may return `nn.Partitioned` leaves) with the shardings
        the logical rules give them, as ShapeDtypeStructs; fixes the shardings the steps compile for."""
        with self.activate():
            abstract_boxed = jax.eval_shape(init_fn, key, dummy_input)
        self.state_shardings = sharding.tree_shardings(abstract_boxed, self.mesh, self.rules)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            sharding.unbox(abstract_boxed), self.state_shardings,
        )
        self._jitted.clear()
        return self.abstract_state

    def init_sharded(self, init_fn: Callable[[jax.Array, jax.Array], Any], key: jax.Array, dummy_input) -> Any:
        """Run `init_fn(key, dummy_input)` straight into its shardings (`abstract_sharded`, then
        `jit(out_shardings=...)`): no device ever holds more than its shards."""
        self.abstract_sharded(init_fn, key, dummy_input)
        with self.activate():
            init = jax.jit(lambda k, x: sharding.unbox(init_fn(k, x)), out_shardings=self.state_shardings)
            return init(key, dummy_input)

    # --- the compiled steps -------------------------------------------------------------------------
    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update on the global batch. Donates `state`: do not reuse the argument."""
        return self._run("train", state, batch)

    def eval_step(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        """Loss (and extra) sums and counts on a batch, no update."""
        return self._run("eval", state, batch)

    def loss_and_grad(self, params: Any, batch: Batch) -> tuple[jax.Array, Any]:
        """The train step's loss and gradients (after the single division), without an update."""
        return self._run("grad", params, batch)

    def lower(self, kind: str, first: Any, batch: Batch) -> jax.stages.Lowered:
        """The jitted "train", "eval" or "grad" step lowered for (possibly abstract) inputs, under the
        mesh: `.compile()` it for memory and cost analysis (plans, benchmarks) without running it."""
        with self.activate():
            return self._build(kind).lower(first, batch)

    def _run(self, kind: str, first: Any, batch: Batch):
        self._check_batch(batch)
        self._check_ids(batch)
        if kind not in self._jitted:
            self._jitted[kind] = self._build(kind)
        batch = {key: batch[key] for key in BATCH_KEYS if key in batch}
        with self.activate():
            return self._jitted[kind](first, batch)

    def _build(self, kind: str) -> Callable:
        if self.state_shardings is None:
            raise RuntimeError("call create_train_state first: it fixes the shardings the steps compile for")
        batch_sh = sharding.batch_sharding(self.mesh)  # a prefix: every batch array is [B, T]
        repl = sharding.replicated(self.mesh)
        options = self.compiler_options
        if kind == "train":
            return jax.jit(self._train_step_fn, in_shardings=(self.state_shardings, batch_sh),
                           out_shardings=(self.state_shardings, repl), donate_argnums=0, compiler_options=options)
        if kind == "eval":
            return jax.jit(self._eval_step_fn, in_shardings=(self.state_shardings, batch_sh), out_shardings=repl,
                           compiler_options=options)
        params_sh = self.state_shardings.params
        return jax.jit(self._grad_fn, in_shardings=(params_sh, batch_sh), out_shardings=(repl, params_sh),
                       compiler_options=options)

    def _sums_and_grads(self, params: Any, batch: Batch):
        """Summed loss, token count, extra sums and the gradient of the sum, over `grad_accum_steps` micro-batches."""
        def micro(mb):
            def f(p):
                terms, extra = self.loss_terms(p, mb)
                return terms.loss_sum, (terms.num_tokens, extra)
            (loss_sum, (num_tokens, extra)), grads = jax.value_and_grad(f, has_aux=True)(params)
            return (loss_sum, num_tokens, extra), grads

        k = self.grad_accum_steps
        if k == 1:
            return micro(batch)
        micro_batches = {key: sharding.split_microbatches(x, k, self.mesh) for key, x in batch.items()}

        def body(acc, mb):
            sums, grads = micro(mb)
            return jax.tree.map(jnp.add, acc, (sums, grads)), None

        zero_sums, _ = jax.eval_shape(micro, jax.tree.map(lambda x: x[0], micro_batches))
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums), jax.tree.map(
            lambda p: jnp.zeros(p.shape, jnp.float32), params
        )
        (sums, grads), _ = jax.lax.scan(body, init, micro_batches)
        return sums, grads

    def _mean_grads(self, params: Any, batch: Batch):
        """Sums and the gradient of the token-weighted mean: the single division of the whole step."""
        (loss_sum, num_tokens, extra), grads = self._sums_and_grads(params, batch)
        denom = jnp.maximum(num_tokens, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
        return loss_sum, num_tokens, extra, grads

    def _grad_fn(self, params, batch):
        loss_sum, num_tokens, _, grads = self._mean_grads(params, batch)
        return loss_sum / jnp.maximum(num_tokens, 1.0), grads

    def _train_step_fn(self, state: TrainState, batch: Batch):
        loss_sum, num_tokens, extra, grads = self._mean_grads(state.params, batch)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Real (non-pad) tokens, for throughput and MFU on the work that counts; without segment ids every
        # position is real.
        if "segment_ids" in batch:
            num_real = jnp.sum(batch["segment_ids"] != 0, dtype=jnp.float32)
        else:
            num_real = jnp.float32(batch["input_ids"].size)
        metrics = {"loss": loss_sum / jnp.maximum(num_tokens, 1.0), "loss_sum": loss_sum, "num_tokens": num_tokens,
                   "num_real_tokens": num_real, "grad_norm": optax.tree.norm(grads), **extra}
        return TrainState(params, opt_state, state.step + 1), metrics

    def _eval_step_fn(self, state: TrainState, batch: Batch):
        terms, extra = self.loss_terms(state.params, batch)
        return {"loss": terms.mean(), "loss_sum": terms.loss_sum, "num_tokens": terms.num_tokens, **extra}

    # --- input checks (host side) -------------------------------------------------------------------
    def _check_ids(self, batch: Batch) -> None:
        """Every batch: token ids in [0, vocab) and labels in [0, vocab) or -100. Checked on the host
        because inside the step an out-of-range id is silently wrapped or clamped by the gathers. Reads
        this process's shards only (a few bytes per position)."""
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        for key, allowed in (("input_ids", ()), ("labels", (IGNORE_INDEX,))):
            parts = _host_parts(batch[key])
            bad = [p[(p < 0) | (p >= vocab) if vocab else (p < 0)] for p in parts]
            bad = np.concatenate([b[~np.isin(b, allowed)] for b in bad]) if bad else np.zeros(0)
            if bad.size:
                limit = f"[0, {vocab})" if vocab else ">= 0"
                also = " or -100 (ignored)" if allowed else ""
                raise UserError(f"batch[{key!r}] holds {int(bad[0])} ({bad.size} such value(s)); ids must be in "
                                f"{limit}{also} for a model with vocab_size={vocab}")

    def _check_batch(self, batch: Batch) -> None:
        """Keys, shapes, dtypes and divisibility: once per batch signature."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a mapping of arrays with keys {BATCH_KEYS}, got {type(batch).__name__}")
        signature = tuple(sorted((k, tuple(np.shape(v)), str(getattr(v, "dtype", None))) for k, v in batch.items()))
        if signature in self._checked_signatures:
            return
        for key in ("input_ids", "labels"):
            if key not in batch:
                raise KeyError(f"batch is missing {key!r}; it has keys {sorted(batch)}")
        unknown = sorted(set(batch) - set(BATCH_KEYS))
        if unknown:
            raise KeyError(f"batch has unknown keys {unknown}; allowed keys are {list(BATCH_KEYS)}")
        shape = tuple(np.shape(batch["input_ids"]))
        if len(shape) != 2:
            raise ValueError(f"batch['input_ids'] must be [batch, length], got shape {shape}")
        for key, value in batch.items():
            dtype = np.dtype(value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype)
            if tuple(np.shape(value)) != shape:
                raise ValueError(f"batch[{key!r}] has shape {tuple(np.shape(value))}, expected {shape} like input_ids")
            if key != "loss_mask" and not np.issubdtype(dtype, np.integer):
                raise TypeError(f"batch[{key!r}] must hold integer ids, got dtype {dtype}")
        rows, dp, k = shape[0], sharding.data_parallel_size(self.mesh), self.grad_accum_steps
        if rows % dp:
            raise UserError(
                f"batch size {rows} (batch['input_ids'].shape={shape}) is not divisible by the data-parallel "
                f"size data x fsdp = {dp} of mesh {dict(self.mesh.shape)}"
            )
        if rows % k:
            raise UserError(f"batch size {rows} is not divisible by grad_accum_steps={k}")
        self._checked_signatures.add(signature)


def _host_parts(x: Any) -> list[np.ndarray]:
    """This process's data of a host or device array (a jax array's addressable shards)."""
    if isinstance(x, jax.Array):
        return [np.asarray(shard.data) for shard in x.addressable_shards]
    return [np.asarray(x)]
