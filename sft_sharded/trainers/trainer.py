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
import optax

from sft_sharded import batch as batch_format
from sft_sharded.parallel import devices, sharding
from sft_sharded.batch import BATCH_KEYS
from sft_sharded.losses import LossTerms, safe_mean
from sft_sharded.trainers import partition

Batch = Mapping[str, Any]
# XLA:CPU's YNNPACK fusions (a dot fused with its elementwise neighbours) ran the one-device step up to 1.7x
# slower than plain dots plus loop fusions on a CPU without AMX (an AMD EPYC host), and 1.12-1.17x faster
# on one with AMX's bfloat16 tiles, for which YNNPACK has dot kernels (an Intel Xeon host; jax 0.10 and
# 0.12, the side-by-side shape, benchmarks/README.md): a single CPU device compiles without them unless the
# CPU has AMX. A CPU mesh of several devices keeps them (its step ran 1.5x faster with them on the AMD
# host) and adds oneDNN's kernels (bf16 dots then run in bf16 rather than widened to float32): 1.15-1.3x
# faster there on the AMD host, no different on the Intel one; an XLA built without oneDNN ignores the
# option. Other platforms get no options.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
CPU_MESH_COMPILER_OPTIONS = {"xla_cpu_use_onednn": True}


def default_compiler_options(mesh: jax.sharding.Mesh, cpu_flags: frozenset[str] | None = None) -> dict[str, Any]:
    """The XLA options a Trainer compiles its steps with unless given some (see above); `cpu_flags` are the
    host CPU's (`devices.cpu_flags()` when None)."""
    if mesh.devices.flat[0].platform != "cpu":
        return {}
    if mesh.devices.size > 1:
        return dict(CPU_MESH_COMPILER_OPTIONS)
    flags = devices.cpu_flags() if cpu_flags is None else cpu_flags
    return {} if "amx_bf16" in flags else dict(CPU_COMPILER_OPTIONS)


@flax.struct.dataclass
class TrainState:
    """`params` and `opt_state` are what training updates; `frozen` holds parameters the model uses but
    nothing updates (LoRA's base weights: no gradients, no optimizer state), None in full fine-tuning."""

    params: Any
    opt_state: Any
    step: jax.Array
    frozen: Any = None


class Trainer(abc.ABC):
    """Base trainer: mesh, optimizer, gradient accumulation, logical rules and the compiled steps.
    Options: `mesh` (default: every device on "fsdp"), `grad_accum_steps`, `rules` (logical axis rules;
    default `sharding.LOGICAL_AXIS_RULES`), `compiler_options` (XLA options for the compiled steps;
    default `default_compiler_options(mesh)`).

    The steps compile for the shardings of the state they are given (a fresh, restored or abstract one),
    so the trainer holds no state of its own beyond its compiled functions."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: optax.GradientTransformation,
        *,
        mesh: jax.sharding.Mesh | None = None,
        grad_accum_steps: int = 1,
        rules=sharding.LOGICAL_AXIS_RULES,
        compiler_options: dict[str, Any] | None = None,
    ):
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={grad_accum_steps!r} must be an int >= 1")
        self.model = model
        self.optimizer = optimizer
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.grad_accum_steps = grad_accum_steps
        self.rules = rules
        self.compiler_options = default_compiler_options(self.mesh) if compiler_options is None else compiler_options
        # Set by a subclass whose loss uses dropout: the train step then passes `loss_terms` an `rng`,
        # a function of this seed, the step and the micro-batch (eval and `loss_and_grad` never drop).
        self.dropout_seed: int | None = None
        self._jitted: dict[tuple, Callable] = {}
        self._checked_signatures: set = set()

    # --- what a subclass provides -------------------------------------------------------------------
    @abc.abstractmethod
    def create_train_state(self, key: jax.Array, dummy_input: jax.Array) -> TrainState:
        """Sharded TrainState(params, opt_state, step=0); implementations call `init_sharded`."""

    @abc.abstractmethod
    def compute_loss(self, params: Any, batch: Batch) -> jax.Array:
        """Scalar float32 loss of the batch."""

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary, against which batches' token ids are checked (None: not checked)."""
        return None

    def abstract_train_state(self, key: jax.Array, dummy_input: Any) -> TrainState:
        """What `create_train_state` returns, as ShapeDtypeStructs with shardings; nothing is allocated
        (a restore target, an AOT plan's input, the shapes an import fills). Implementations call
        `abstract_sharded` with the init function `create_train_state` uses."""
        raise NotImplementedError(f"{type(self).__name__} does not provide abstract_train_state")

    def loss_terms(self, params: Any, batch: Batch,
                   rng: jax.Array | None = None) -> tuple[LossTerms, dict[str, jax.Array]]:
        """(loss sum, weight) and extra metric sums. Default: the mean with weight 1, so micro-batches
        count equally; SFTTrainer overrides it with per-token sums for exact token weighting. `rng` is
        given only in training steps of a trainer with `dropout_seed` set."""
        return LossTerms(self.compute_loss(params, batch), jnp.float32(1.0)), {}

    # --- mesh context and sharded init --------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self):
        """The mesh and logical rules that model code (and its sharding constraints) trace under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def abstract_sharded(self, init_fn: Callable[[jax.Array, jax.Array], Any], key: jax.Array, dummy_input) -> Any:
        """Shapes of `init_fn(key, dummy_input)` (which may return `nn.Partitioned` leaves) as
        ShapeDtypeStructs carrying the shardings the logical rules give them."""
        with self.activate():
            abstract_boxed = jax.eval_shape(init_fn, key, dummy_input)
        shardings = sharding.tree_shardings(abstract_boxed, self.mesh, self.rules)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            sharding.unbox(abstract_boxed), shardings)

    def init_sharded(self, init_fn: Callable[[jax.Array, jax.Array], Any], key: jax.Array, dummy_input) -> Any:
        """Run `init_fn(key, dummy_input)` straight into the shardings of `abstract_sharded`
        (`jit(out_shardings=...)`): no device ever holds more than its shards."""
        shardings = sharding.shardings_of(self.abstract_sharded(init_fn, key, dummy_input))
        with self.activate():
            init = jax.jit(lambda k, x: sharding.unbox(init_fn(k, x)), out_shardings=shardings)
            return init(key, dummy_input)

    # --- the compiled steps -------------------------------------------------------------------------
    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update on the global batch. Donates `state`: do not reuse the argument."""
        return self._run("train", state, batch)

    def eval_step(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        """Loss (and extra) sums and counts on a batch, no update."""
        return self._run("eval", state, batch)

    def loss_and_grad(self, params: Any, batch: Batch, frozen: Any = None) -> tuple[jax.Array, Any]:
        """The train step's loss and gradients with respect to `params` (after the single division),
        without an update; `frozen` is the state's frozen part, if it has one."""
        return self._run("grad", (params, frozen), batch)

    def lower(self, kind: str, first: Any, batch: Batch) -> jax.stages.Lowered:
        """The jitted "train", "eval" or "grad" step lowered for (possibly abstract) inputs, under the
        mesh: `.compile()` it for memory and cost analysis (plans, benchmarks) without running it. For
        "grad", `first` is the params, or (params, frozen) when the state has a frozen part."""
        if kind == "grad" and not isinstance(first, tuple):
            first = (first, None)
        with self.activate():
            return self._compiled(kind, first).lower(first, batch)

    def _run(self, kind: str, first: Any, batch: Batch):
        signature = batch_format.signature(batch) if isinstance(batch, Mapping) else None
        if signature not in self._checked_signatures:
            batch_format.check_layout(batch, sharding.data_parallel_size(self.mesh), self.grad_accum_steps,
                                      sharding.context_size(self.mesh))
            self._checked_signatures.add(signature)
        batch_format.check_ids(batch, self.vocab_size)
        batch = {key: batch[key] for key in BATCH_KEYS if key in batch}
        with self.activate():
            return self._compiled(kind, first)(first, batch)

    def _compiled(self, kind: str, first: Any) -> Callable:
        """The jitted step for the shardings of `first` (the state, or the params for "grad")."""
        first_sh = sharding.shardings_of(first)
        key = (kind, jax.tree.structure(first_sh), tuple(jax.tree.leaves(first_sh)))
        if key in self._jitted:
            return self._jitted[key]
        batch_sh = sharding.batch_sharding(self.mesh)  # a prefix: every batch array is [B, T]
        repl = sharding.replicated(self.mesh)
        options = self.compiler_options
        if kind == "train":
            fn = jax.jit(self._train_step_fn, in_shardings=(first_sh, batch_sh), out_shardings=(first_sh, repl),
                         donate_argnums=0, compiler_options=options)
        elif kind == "eval":
            fn = jax.jit(self._eval_step_fn, in_shardings=(first_sh, batch_sh), out_shardings=repl,
                         compiler_options=options)
        else:
            fn = jax.jit(self._grad_fn, in_shardings=(first_sh, batch_sh), out_shardings=(repl, first_sh[0]),
                         compiler_options=options)
        self._jitted[key] = fn
        return fn

    def _sums_and_grads(self, params: Any, frozen: Any, batch: Batch, rng: jax.Array | None = None):
        """Summed loss, token count, extra sums and the gradient of the sum with respect to `params` (not
        `frozen`: no gradient of a frozen weight is ever formed), over `grad_accum_steps` micro-batches.
        `rng` (training with dropout) is folded with the micro-batch index and handed to `loss_terms`.

        Over several micro-batches on a mesh with replicas (its `data` axis, the axis that spans slices over
        DCN), each replica accumulates its own rows' gradient and the replicas sum once at the end: left to
        itself, XLA all-reduces every micro-batch's gradient over the replicas. The replicas are a vmapped
        axis laid on the data axis (`spmd_axis_name`) rather than a `shard_map` over it, whose partially
        manual region XLA 0.12's partitioner aborts on (the embedding gather of a table split on `tensor`).
        XLA still sums per micro-batch in two cases: with dropout, whose masks are drawn for the whole
        micro-batch as on any other mesh (it trains LoRA's small gradient), and for a model that cannot be
        vmapped (`replicas_accumulate_apart`).
        """
        k = self.grad_accum_steps
        micro_batches = batch if k == 1 else {key: sharding.split_microbatches(x, k, self.mesh)
                                              for key, x in batch.items()}
        whole = self.whole_batch(partition.merge(params, frozen), batch, micro_batches)
        if k == 1:
            return self._micro(params, frozen, batch, 0, whole, rng)
        axis, rows = sharding.REPLICA_AXIS, micro_batches[BATCH_KEYS[0]].shape[1]
        replicas = self.mesh.shape[axis]
        if (replicas == 1 or rng is not None or not self.replicas_accumulate_apart
                or rows % sharding.data_parallel_size(self.mesh)):
            return self._accumulate(params, frozen, micro_batches, whole, rng)
        # [k, rows, ...] -> [k, replicas, rows / replicas, ...]: the rows are split over the data axis first
        # (sharding.BATCH_AXES), so a replica's rows are one contiguous block and nothing moves between devices.
        own = {key: x.reshape(k, replicas, rows // replicas, *x.shape[2:]) for key, x in micro_batches.items()}

        def per_replica(own_micro_batches):
            with nn.logical_axis_rules(sharding.without_axis(self.rules, axis)):
                return self._accumulate(params, frozen, own_micro_batches, whole, None)

        sums, grads = jax.vmap(per_replica, in_axes=1, spmd_axis_name=axis)(own)
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), (sums, grads))

    def _micro(self, params, frozen, mb: Batch, index, whole, rng):
        """Sums and gradient of one micro-batch."""
        extra_args = {} if rng is None else {"rng": jax.random.fold_in(rng, index)}
        if whole is not None:
            extra_args["whole"] = whole

        def f(p):
            terms, extra = self.loss_terms(partition.merge(p, frozen), mb, **extra_args)
            return terms.loss_sum + terms.penalty, (terms.loss_sum, terms.num_tokens, extra)
        (_, (loss_sum, num_tokens, extra)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return (loss_sum, num_tokens, extra), grads

    def _accumulate(self, params, frozen, micro_batches: Batch, whole, rng):
        """Sums and gradient over the micro-batches (leading axis of `micro_batches`), one at a time."""
        def micro(mb, index):
            return self._micro(params, frozen, mb, index, whole, rng)

        def body(acc, xs):
            sums, grads = micro(*xs)
            return jax.tree.map(jnp.add, acc, (sums, grads)), None

        k = micro_batches[BATCH_KEYS[0]].shape[0]
        zero_sums, _ = jax.eval_shape(micro, jax.tree.map(lambda x: x[0], micro_batches), 0)
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums), jax.tree.map(
            lambda p: jnp.zeros(p.shape, jnp.float32), params
        )
        (sums, grads), _ = jax.lax.scan(body, init, (micro_batches, jnp.arange(k)))
        return sums, grads

    @property
    def replicas_accumulate_apart(self) -> bool:
        """Whether the model can be vmapped over the data axis's replicas (`_sums_and_grads`)."""
        return True

    def whole_batch(self, params: Any, batch: Batch, micro_batches: Batch) -> Any:
        """What every micro-batch's loss needs to know about the whole batch (a subclass's hook; None here,
        and then `loss_terms` gets no `whole`)."""
        return None

    def _mean_grads(self, params: Any, frozen: Any, batch: Batch, rng: jax.Array | None = None):
        """Sums and the gradient of the token-weighted mean: the single division of the whole step."""
        (loss_sum, num_tokens, extra), grads = self._sums_and_grads(params, frozen, batch, rng)
        grads = jax.tree.map(lambda g, p: safe_mean(g, num_tokens).astype(p.dtype), grads, params)
        return loss_sum, num_tokens, extra, grads

    def _grad_fn(self, params_and_frozen, batch):
        loss_sum, num_tokens, _, grads = self._mean_grads(*params_and_frozen, batch)
        return safe_mean(loss_sum, num_tokens), grads

    def _train_step_fn(self, state: TrainState, batch: Batch):
        rng = None if self.dropout_seed is None else jax.random.fold_in(jax.random.key(self.dropout_seed), state.step)
        loss_sum, num_tokens, extra, grads = self._mean_grads(state.params, state.frozen, batch, rng)
        with jax.named_scope("optimizer"):  # the scopes name the step's parts in a profile (step_profile.py)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        with jax.named_scope("metrics"):
            # Real (non-pad) tokens, for throughput and MFU on the work that counts; without segment ids every
            # position is real.
            if "segment_ids" in batch:
                num_real = jnp.sum(batch["segment_ids"] != 0, dtype=jnp.float32)
            else:
                num_real = jnp.float32(batch["input_ids"].size)
            metrics = {"loss": safe_mean(loss_sum, num_tokens), "loss_sum": loss_sum, "num_tokens": num_tokens,
                       "num_real_tokens": num_real, "grad_norm": optax.tree.norm(grads), **self.summarize(extra)}
        return TrainState(params, opt_state, state.step + 1, state.frozen), metrics

    def _eval_step_fn(self, state: TrainState, batch: Batch):
        terms, extra = self.loss_terms(partition.merge(state.params, state.frozen), batch)
        return {"loss": terms.mean(), "loss_sum": terms.loss_sum, "num_tokens": terms.num_tokens,
                **self.summarize(extra)}

    def summarize(self, extra: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Metrics from a step's summed extras (a subclass's hook; here: as they are)."""
        return extra
