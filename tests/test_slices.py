"""Meshes over several slices: device groups, the hybrid layout, the refusals, and the gradient that crosses
DCN once per optimizer step (read from the compiled HLO's device groups)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_sharded.batch import BATCH_KEYS
from sft_sharded.config import ConfigError, load_config
from sft_sharded.errors import UserError
from sft_sharded.parallel import hlo_collectives
from sft_sharded.parallel.sharding import batch_sharding, make_mesh
from sft_sharded.parallel.slices import slice_groups, slice_of_devices
from sft_sharded.run import build_trainer
from sft_sharded.state import abstract_state


def fake(id, process=0, slice_index=None, platform="cpu"):
    return types.SimpleNamespace(id=id, process_index=process, slice_index=slice_index, platform=platform)


def test_slice_groups_by_process_on_cpu_and_by_slice_id_on_tpu():
    cpu = [fake(i, process=i // 2) for i in range(4)]
    assert [[d.id for d in g] for g in slice_groups(cpu, 2)] == [[0, 1], [2, 3]]
    assert [[d.id for d in g] for g in slice_groups(cpu, 1)] == [[0, 1, 2, 3]]  # one slice: processes ignored
    tpu = [fake(i, process=i // 2, slice_index=1 - i % 2, platform="tpu") for i in range(4)]
    assert [[d.id for d in g] for g in slice_groups(tpu, 2)] == [[1, 3], [0, 2]]  # slice ids, not processes
    assert slice_of_devices(np.array(tpu)) == [1, 0, 1, 0]


@pytest.mark.parametrize("devices, slices, message", [
    ([fake(i, process=0) for i in range(4)], 2, "mesh.slices=2, but the 4 devices lie in 1 process (off TPUs each process stands in"),
    ([fake(i, slice_index=None, platform="tpu") for i in range(4)], 2, "TPU device 0 has no slice id"),
    ([fake(i, slice_index=i // 2, platform="tpu") for i in range(4)], 1, "mesh.slices=1, but the 4 devices lie in 2 slices"),
    ([fake(i, process=int(i > 0)) for i in range(4)], 2, "the slices hold different numbers of devices ([1, 3])"),
])
def test_slice_groups_refusals(devices, slices, message):
    with pytest.raises(UserError) as err:
        slice_groups(devices, slices)
    assert message in str(err.value)


def test_a_two_slice_mesh_keeps_every_axis_but_data_inside_a_slice():
    devices = jax.devices()
    groups = [devices[4:], devices[:4]]  # slice 0 is the second half: the order comes from the groups
    mesh = make_mesh(data=2, fsdp=2, tensor=2, slices=2, groups=groups)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "context": 1, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert {int(i) for i in ids[0].flat} == {4, 5, 6, 7} and {int(i) for i in ids[1].flat} == {0, 1, 2, 3}
    across = make_mesh(data=1, fsdp=8, slices=2, dcn_axis="fsdp", groups=groups)  # fsdp spans slices, by option
    fsdp_ids = np.vectorize(lambda d: d.id)(across.devices).reshape(-1)
    assert set(fsdp_ids[:4]) == {4, 5, 6, 7} and set(fsdp_ids[4:]) == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs, message", [
    (dict(data=1, fsdp=8, slices=2), "mesh.data=1 is not a multiple of mesh.slices=2: only data spans slices"),
    (dict(data=4, fsdp=2, slices=4, dcn_axis="fsdp"), "mesh.fsdp=2 is not a multiple of mesh.slices=4: only fsdp"),
    (dict(data=1, fsdp=-1, slices=3), "mesh.slices=3 does not divide the 8 devices"),
    (dict(data=2, fsdp=-1, slices=2), "but the 8 devices lie in 1 process (off TPUs"),  # one process: no second slice
])
def test_make_mesh_refuses_axes_that_straddle_slices(kwargs, message):
    with pytest.raises(UserError) as err:
        make_mesh(**kwargs)
    assert message in str(err.value)


def test_mesh_slices_config_key():
    cfg = load_config(None, ["mesh.slices=2", "mesh.dcn_axis=fsdp"])
    assert (cfg.mesh.slices, cfg.mesh.dcn_axis) == (2, "fsdp")
    assert list(cfg.mesh.axis_sizes()) == ["data", "fsdp", "expert", "context", "tensor"]
    with pytest.raises(ConfigError, match="mesh.slices=0 must be an int >= 1"):
        load_config(None, ["mesh.slices=0"])
    with pytest.raises(ConfigError, match="mesh.dcn_axis='tensor' must be one of"):
        load_config(None, ["mesh.dcn_axis=tensor"])


@pytest.mark.parametrize("attributes, groups", [
    ("replica_groups={{0,2},{1,3}}, to_apply=%add", [[0, 2], [1, 3]]),
    ("replica_groups=[2,4]<=[8], to_apply=%add", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("source_target_pairs={{0,1},{1,0}}", [[0, 1], [1, 0]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, use_global_device_ids=true",
     [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_0','axis_2'}, use_global_device_ids=true",
     [[0, 1, 4, 5], [2, 3, 6, 7]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}, to_apply=%add",
     [[0, 2, 4, 6], [1, 3, 5, 7]]),
    ("replica_groups={}, to_apply=%add", None),
])
def test_device_groups_in_each_printed_form(attributes, groups):
    got = hlo_collectives.device_groups(attributes)
    assert got == groups
    slice_of = [0, 0, 0, 0, 1, 1, 1, 1]
    want = groups is None or any(len({slice_of[i] for i in g}) > 1 for g in groups)
    assert hlo_collectives.crosses_slices(got, slice_of) == want


@pytest.fixture(scope="module")
def dcn_bytes_by_accumulation():
    """DCN traffic of the compiled tiny train step on 2 slices of 4 devices (data=2 x fsdp=2 x tensor=2),
    with 1 and with 4 micro-batches per step."""
    devices = jax.devices()
    mesh = make_mesh(data=2, fsdp=2, tensor=2, slices=2, groups=[devices[:4], devices[4:]])
    slice_of = [int(d.id >= 4) for d in mesh.devices.flat]
    out = {}
    for k in (1, 4):
        cfg = load_config(None, [f"optim.grad_accum_steps={k}", "data.batch_size=16", "data.max_length=32",
                                 "model.scan_layers=true"])
        trainer = build_trainer(cfg, mesh=mesh)
        batch = {key: jax.ShapeDtypeStruct((16, 32), jnp.float32 if key == "loss_mask" else jnp.int32,
                                           sharding=batch_sharding(mesh)) for key in BATCH_KEYS}
        hlo = trainer.lower("train", abstract_state(trainer, cfg), batch).compile().as_text()
        out[k] = hlo_collectives.collectives(hlo, slice_of)
    return out


def test_the_gradient_crosses_dcn_once_per_optimizer_step(dcn_bytes_by_accumulation):
    """Four micro-batches move the same bytes over DCN as one: the replicas (slices) each accumulate their
    own gradient and sum once, instead of all-reducing every micro-batch's gradient."""
    one, four = dcn_bytes_by_accumulation[1], dcn_bytes_by_accumulation[4]
    dcn = {k: sum(t["dcn_bytes"] for t in totals.values()) for k, totals in dcn_bytes_by_accumulation.items()}
    assert dcn[1] > 0
    assert dcn[4] <= dcn[1] * 1.05, (one, four)
    # and there is one reduction of the whole tree (plus the metrics' scalars), not one per micro-batch
    assert four["all-reduce"]["dcn_count"] <= 3 and four["all-gather"]["dcn_count"] == 0, four
    # ICI traffic (weights gathered per micro-batch over fsdp) does grow with the micro-batches
    ici = {k: sum(t["bytes"] - t["dcn_bytes"] for t in totals.values())
           for k, totals in dcn_bytes_by_accumulation.items()}
    assert ici[4] > ici[1]


def test_dcn_report_line(dcn_bytes_by_accumulation):
    line = hlo_collectives.report(dcn_bytes_by_accumulation[4])
    assert "across slices (DCN): all-reduce" in line and "inside slices (ICI)" in line
