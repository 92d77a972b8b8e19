"""The one place that knows mesh axis names: mesh, logical-axis rules, shardings, global batches.

Models speak logical names only ("embed", "mlp", "heads", ...). `LOGICAL_AXIS_RULES` maps them to the
mesh axes `data` (replicas), `fsdp` (data parallel with sharded params and optimizer state), `expert`
(data parallel with a mixture's experts split between the groups), `context` (the sequence split between
devices: long rows; weights and optimizer state sharded over it as over fsdp) and `tensor` (Megatron-style
splits of heads, mlp and vocab). A dimension its mesh axes do not divide is replicated on
those axes with a one-time warning: the table says where things go when they can, the shapes decide.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sft_sharded.config import MeshConfig
from sft_sharded.errors import UserError
from sft_sharded.parallel.slices import hybrid_devices, slice_groups

MESH_AXES = tuple(MeshConfig().axis_sizes())  # data, fsdp, expert, context, tensor
# Rows are split over data, fsdp and expert (an expert group holds its own rows, as an fsdp group does),
# positions of a row over context.
BATCH_AXES = ("data", "fsdp", "expert")
SEQUENCE_AXIS = "context"
# Replicas of the whole model (no weight is split on it): the axis that spans slices over DCN by default,
# and the one over which gradient accumulation sums once per step (trainers/trainer.py).
REPLICA_AXIS = "data"

# Logical name -> mesh axes. Activation names ("act_*") are separate from weight names so that sharding
# a weight's hidden dim on fsdp does not drag the residual stream onto fsdp: gathering a weight per layer
# is cheap, resharding every activation is not.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("replica_batch", "data"),  # the rows of one fsdp group: the embedding lookup gathers ids only within it
    # The looked-up rows halfway to the residual stream: positions already split over context, the hidden
    # dim still over fsdp (each step is then one all-to-all over one axis; XLA cannot do both at once).
    ("lookup_embed", "fsdp"),
    # Weights are split over context as over fsdp (gathered per layer): a context group holds no more
    # weights per chip than an fsdp group of the same size.
    ("embed", ("fsdp", SEQUENCE_AXIS)),
    ("act_embed", None),
    ("mlp", "tensor"),
    ("act_mlp", "tensor"),
    ("heads", "tensor"),
    ("act_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("act_vocab", "tensor"),
    ("length", SEQUENCE_AXIS),  # activations' positions (attention over a split sequence: models/attention/split.py)
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),  # LoRA's rank dimension: small, replicated
    ("exp", "expert"),  # a mixture's experts: expert parallelism (models/moe.py exchanges the tokens)
)

_warned: set[tuple] = set()


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES (missing ones 1) for `num_devices`; one size may be -1 (all remaining devices)."""
    sizes = {name: sizes.get(name, 1) for name in MESH_AXES}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise UserError(f"mesh.{name}={size!r}: each mesh size must be a positive int or -1")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise UserError(f"mesh {sizes}: at most one axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise UserError(f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
                            f"{num_devices} available devices")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        described = " x ".join(f"{name}={size}" for name, size in sizes.items())
        raise UserError(f"mesh {described} = {math.prod(sizes.values())} devices, but {num_devices} devices "
                        "are available")
    return tuple(sizes.values())


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None,
              expert: int = 1, context: int = 1, slices: int = 1, dcn_axis: str = "data",
              groups: Sequence[Sequence[Any]] | None = None) -> Mesh:
    """A Mesh with axes MESH_AXES over `devices` (default: all); one size may be -1. With `slices` > 1 the
    `dcn_axis` ("data" or "fsdp") spans the slices, every other axis stays inside one; `groups` (the
    devices of each slice) defaults to the devices' own slices (`slices.slice_groups`)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(data=data, fsdp=fsdp, expert=expert, context=context, tensor=tensor), len(devices))
    if slices == 1 and groups is None:
        slice_groups(devices, 1)  # refuses devices of several TPU slices under one ICI mesh
        # jax.make_mesh orders devices by physical topology (TPU/GPU); Auto axes keep flax logical rules working.
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    ici, dcn = slice_shapes(shape, slices, dcn_axis)
    array = hybrid_devices(ici, dcn, slice_groups(devices, slices) if groups is None else groups)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def slice_shapes(shape: Sequence[int], slices: int, dcn_axis: str = "data") -> tuple[list[int], list[int]]:
    """(inside one slice, across slices) sizes of MESH_AXES for a mesh of `shape` over `slices` slices."""
    if dcn_axis not in ("data", "fsdp"):
        raise UserError(f"mesh.dcn_axis={dcn_axis!r} must be 'data' or 'fsdp'")
    sizes = dict(zip(MESH_AXES, shape))
    if math.prod(shape) % slices:
        raise UserError(f"mesh.slices={slices} does not divide the {math.prod(shape)} devices")
    if sizes[dcn_axis] % slices:
        other = "fsdp" if dcn_axis == "data" else "data"
        raise UserError(f"mesh.{dcn_axis}={sizes[dcn_axis]} is not a multiple of mesh.slices={slices}: only "
                        f"{dcn_axis} spans slices (mesh {sizes}); every other axis stays inside one slice"
                        f" (mesh.dcn_axis={other} lets {other} span them instead)")
    ici = [size // slices if name == dcn_axis else size for name, size in sizes.items()]
    dcn = [slices if name == dcn_axis else 1 for name in sizes]
    return ici, dcn


def _axis_size(mesh_axes: Any, mesh: Mesh) -> int:
    if mesh_axes is None:
        return 1
    names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return math.prod(mesh.shape[name] for name in names)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, what: str = "array") -> P:
    """Drop the mesh axes of any dimension they do not divide (replicate it), warning once."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    for dim, mesh_axes in enumerate(entries):
        size = _axis_size(mesh_axes, mesh)
        if size > 1 and shape[dim] % size:
            key = (shape[dim], mesh_axes)  # once per size and axes, not once per leaf
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"{what}: dimension {dim} of shape {tuple(shape)} is not divisible by mesh axes "
                    f"{mesh_axes} (size {size}); replicating it on those axes (here and in every other "
                    f"array with a dimension of {shape[dim]} on {mesh_axes})",
                    stacklevel=3,
                )
            entries[dim] = None
    return P(*entries)


def logical_to_sharding(
    logical_spec: P | None, shape: Sequence[int], mesh: Mesh, rules=LOGICAL_AXIS_RULES, what: str = "array"
) -> NamedSharding:
    """NamedSharding for one array from its logical axis names (None or P() means replicated)."""
    if logical_spec is None or len(logical_spec) == 0:
        return NamedSharding(mesh, P())
    mesh_spec = nn.logical_to_mesh_axes(tuple(logical_spec), rules)
    return NamedSharding(mesh, fit_spec(mesh_spec, shape, mesh, what))


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """Shardings for an abstract tree whose leaves may be boxed in `nn.LogicallyPartitioned`.

    Returns a tree with the unboxed structure (the one the jitted functions see).
    """
    def one(path, leaf):
        what = jax.tree_util.keystr(path)
        if isinstance(leaf, nn.Partitioned):
            names = leaf.names
            value = leaf.value
            if not isinstance(leaf, nn.LogicallyPartitioned):  # already mesh axis names
                return NamedSharding(mesh, fit_spec(P(*names), value.shape, mesh, what))
            return logical_to_sharding(P(*names), value.shape, mesh, rules, what)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def shardings_of(tree: Any) -> Any:
    """The sharding of every leaf (arrays and ShapeDtypeStructs alike)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def key_name(entry: Any) -> str:
    """The name of one entry of a pytree path (a dict key, an attribute, an index, or a plain string)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def unbox(tree: Any) -> Any:
    """Take `.value` of every `nn.Partitioned` leaf without applying sharding constraints."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def data_parallel_size(mesh: Mesh) -> int:
    return _axis_size(BATCH_AXES, mesh)


def context_size(mesh: Mesh) -> int:
    """Devices one row's positions are split over (1: whole rows per device)."""
    return mesh.shape.get(SEQUENCE_AXIS, 1)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows split over BATCH_AXES, positions over the context axis; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *((SEQUENCE_AXIS,) if ndim > 1 else ()), *([None] * (ndim - 2))))


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over BATCH_AXES, each row whole (prompts for generation, which gathers the sequence)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def without_axis(rules: Sequence[tuple[str, Any]], axis: str) -> tuple[tuple[str, Any], ...]:
    """`rules` with mesh axis `axis` taken out (code vmapped over it, per replica)."""
    def drop(axes):
        if axes is None or isinstance(axes, str):
            return None if axes == axis else axes
        kept = tuple(a for a in axes if a != axis)
        return kept or None
    return tuple((name, drop(axes)) for name, axes in rules)


def whole_sequence(rules: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """`rules` with activations' positions kept whole on every device (decoding with a KV cache)."""
    return tuple((name, None if name == "length" else axes) for name, axes in rules)


def logical_shards(name: str, size: int) -> int:
    """Into how many parts the current mesh splits a dimension of `size` named `name` (1 outside a mesh,
    or where the parts do not divide it)."""
    mesh = jax.sharding.get_abstract_mesh()
    spec = None if mesh.empty else nn.logical_to_mesh_axes((name,))
    parts = 1 if spec is None else _axis_size(spec[0], mesh)
    return parts if size % parts == 0 else 1


def sequence_shards(length: int) -> int:
    """Into how many parts the current mesh splits a sequence of `length` positions (1 outside a mesh)."""
    return logical_shards("length", length)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def current_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform of the mesh being traced under (an AOT plan for TPU traces
    on a CPU host), else jax's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def activation_spec(shape: Sequence[int], logical_axes: tuple[str | None, ...]) -> P | None:
    """PartitionSpec of an activation under the current mesh and logical rules (None outside a mesh);
    dims that the mesh axes do not divide are replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    mesh_spec = nn.logical_to_mesh_axes(logical_axes)
    if mesh_spec is None:
        return None
    return fit_spec(mesh_spec, shape, mesh, f"activation {logical_axes}")


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint for an activation; a no-op outside a mesh, dims that do not divide replicate.

    Called by models under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` (the Trainer sets both).
    """
    spec = activation_spec(x.shape, logical_axes)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's slice of the batch into global arrays sharded on ("data", "fsdp").

    Single process: the local batch is the global batch. Many processes: each passes its own rows, in
    process order; `make_array_from_process_local_data` never assumes contiguous device ids.
    """
    out = {}
    for key, local in local_batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local, global_shape)
    return out


def split_microbatches(x_BxT: jax.Array, k: int, mesh: Mesh) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ...

    Interleaving keeps every micro-batch spread over all data-parallel devices (each device's rows feed
    every micro-batch) so the split needs no communication.
    """
    rows = x_BxT.shape[0]
    x = x_BxT.reshape(rows // k, k, *x_BxT.shape[1:]).swapaxes(0, 1)
    if (rows // k) % data_parallel_size(mesh) == 0:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, *batch_sharding(mesh, x.ndim - 1).spec)))
    return x


def host_to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full (e.g. prompts)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def global_to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array on every process (a gather when other processes hold parts)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
