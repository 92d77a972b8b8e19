"""Devices grouped by slice, and a device array laid over several slices: an inner shape inside each slice
(ICI, the chips' own links) and an outer shape across slices (DCN, the data-centre network).

A TPU device says which slice it is in (`slice_index`). CPU and GPU devices have no slice: each process
stands in for one (as a GPU node's NVLink island does over the cluster's network). This module knows no
mesh axis names: `sharding.make_mesh` chooses which axis crosses DCN.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.experimental import mesh_utils

from sft_sharded.errors import UserError


def _uses_slice_ids(devices: Sequence[Any]) -> bool:
    return devices[0].platform == "tpu"


def slice_key(device: Any) -> int:
    """The slice a device belongs to: its `slice_index` on TPU, its process elsewhere."""
    if device.platform == "tpu":
        return getattr(device, "slice_index", None)
    return device.process_index


def slice_groups(devices: Sequence[Any], slices: int) -> list[list[Any]]:
    """`devices` grouped by slice, in slice order; refuses a count that is not `slices`."""
    devices = list(devices)
    tpu = _uses_slice_ids(devices)
    if tpu and slices > 1:
        unknown = [d for d in devices if getattr(d, "slice_index", None) is None]
        if unknown:
            raise UserError(f"mesh.slices={slices}: TPU device {unknown[0].id} has no slice id (slice_index): "
                            "the runtime was not started as a multi-slice job (MEGASCALE_* environment)")
    groups: dict[Any, list[Any]] = defaultdict(list)
    for device in devices:
        groups[slice_key(device) if tpu or slices > 1 else 0].append(device)
    if len(groups) != slices:
        n = len(groups)
        what = ("slice" if n == 1 else "slices") if tpu else (
            f"{'process' if n == 1 else 'processes'} (off TPUs each process stands in for a slice)")
        raise UserError(f"mesh.slices={slices}, but the {len(devices)} devices lie in {n} {what}")
    sizes = {len(g) for g in groups.values()}
    if len(sizes) > 1:
        raise UserError(f"mesh.slices={slices}: the slices hold different numbers of devices "
                        f"({sorted(len(g) for g in groups.values())})")
    return [groups[key] for key in sorted(groups)]


def hybrid_devices(ici_shape: Sequence[int], dcn_shape: Sequence[int], groups: Sequence[Sequence[Any]]) -> np.ndarray:
    """A device array of shape ici * dcn (per axis): each slice's devices laid out by jax in its physical order
    (`ici_shape`), the slices tiled by `dcn_shape` (outermost within each axis)."""
    inner = [mesh_utils.create_device_mesh(tuple(ici_shape), list(group), allow_split_physical_axes=True)
             for group in groups]
    blocks = np.empty(tuple(dcn_shape), dtype=object)
    for i, index in enumerate(np.ndindex(*dcn_shape)):
        blocks[index] = inner[i]
    return np.block(blocks.tolist())


def slice_of_devices(devices: np.ndarray) -> list[int]:
    """The slice number (0, 1, ...) of each device of a mesh, in the order of its flattened device array:
    the order of the logical device ids in the compiled program's replica groups."""
    flat = list(np.asarray(devices).flat)
    keys = sorted({slice_key(d) for d in flat}, key=lambda k: (k is None, k))
    number = {key: i for i, key in enumerate(keys)}
    return [number[slice_key(d)] for d in flat]
