"""make_mesh, logical rules with indivisible dimensions, and global batches."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from sft_sharded.parallel.sharding import global_batch, logical_to_sharding, make_mesh, split_microbatches


def test_make_mesh_shapes_axis_types_and_minus_one():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "expert", "context", "tensor")
    assert tuple(mesh.shape.values()) == (2, 2, 1, 1, 2)
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    one = {"data": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
    assert dict(make_mesh().shape) == {**one, "fsdp": 8}
    assert dict(make_mesh(data=-1, fsdp=1, tensor=2).shape) == {**one, "data": 4, "tensor": 2}
    assert dict(make_mesh(1, 1, 1, devices=jax.devices()[:1]).shape) == one
    assert dict(make_mesh(1, 2, 2, expert=2).shape) == {**one, "fsdp": 2, "expert": 2, "tensor": 2}
    assert dict(make_mesh(1, -1, 1, context=4).shape) == {**one, "fsdp": 2, "context": 4}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"data": 3, "fsdp": 3, "tensor": 1}, "= 9 devices, but 8 devices are available"),
        ({"data": 3, "fsdp": -1}, "multiply to 3, which does not divide the 8 available devices"),
        ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
        ({"tensor": 0}, "mesh.tensor=0"),
    ],
)
def test_make_mesh_errors_name_both_counts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(**kwargs)


def test_indivisible_dimension_is_replicated_with_a_warning():
    mesh = make_mesh(1, 2, 4)
    # 6 kv heads appear nowhere else in the suite: the warning is issued once per (size, axes)
    with pytest.warns(UserWarning, match=r"dimension 1 of shape \(32, 6, 8\) is not divisible by mesh axes tensor"):
        sharding = logical_to_sharding(P("embed", "kv_heads", "head_dim"), (32, 6, 8), mesh, what="wk")
    assert sharding.spec == P(("fsdp", "context"), None, None)
    assert logical_to_sharding(P("embed", "heads", "head_dim"), (32, 4, 8), mesh).spec == P(("fsdp", "context"), "tensor", None)


def test_global_batch_is_sharded_on_data_and_fsdp():
    mesh = make_mesh(2, 2, 2)
    local = {"input_ids": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    batch = global_batch(local, mesh)
    assert batch["input_ids"].sharding.spec == P(("data", "fsdp", "expert"), "context")
    np.testing.assert_array_equal(batch["input_ids"], local["input_ids"])
    assert {s.data.shape for s in batch["input_ids"].addressable_shards} == {(2, 4)}


def test_split_microbatches_interleaves_rows():
    mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
    x = np.arange(8)[:, None] * np.ones((1, 3), int)
    with jax.set_mesh(mesh):
        out = np.asarray(jax.jit(lambda a: split_microbatches(a, 4, mesh))(x))
    assert out.shape == (4, 2, 3)
    assert out[:, :, 0].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
