"""TPU slice shapes by name, without jax: chips, hosts and torus links of an accelerator type ("v5p-64") or a
chip grid ("v5p:4x4x2"), for `sft-sharded plan` and the launchers (GKE node selectors, hosts per slice).
"""

from __future__ import annotations

import math
import re

# Per chip: HBM, TensorCores and torus dimensions, from the Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), as published in 2025 (peak FLOP/s: `metrics.peak_flops`).
CHIPS = {
    "v4": {"hbm_bytes": 32 * 2**30, "cores_per_chip": 2, "dims": 3},
    "v5e": {"hbm_bytes": 16 * 2**30, "cores_per_chip": 1, "dims": 2},
    "v5p": {"hbm_bytes": 95 * 2**30, "cores_per_chip": 2, "dims": 3},
    "v6e": {"hbm_bytes": 32 * 2**30, "cores_per_chip": 1, "dims": 2},
}
# Physical shapes for accelerator-type names (v4 and v5p count TensorCores: two per chip).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def parse_topology(name: str) -> tuple[str, str]:
    """"v5p-64" (accelerator type) or "v5p:4x4x2" (chip grid) -> (generation, "AxBxC")."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))", name)
    if not match:
        raise ValueError(f"--topology {name!r}: expected e.g. v5p-64, v6e-256 or v5p:2x2x1 ({sorted(CHIPS)})")
    gen, count, grid = match.groups()
    if grid:
        return gen, grid
    chips = int(count) // CHIPS[gen]["cores_per_chip"]
    shapes = _SHAPES_3D if CHIPS[gen]["dims"] == 3 else _SHAPES_2D
    if chips not in shapes:
        raise ValueError(f"--topology {name!r}: no known chip grid for {chips} chips")
    return gen, shapes[chips]


def _sides(grid: str) -> list[int]:
    """"4x4x8" -> [4, 4, 8]: chips along each axis of the slice."""
    return [int(side) for side in grid.split("x")]


def host_bounds(grid: str) -> tuple[int, int, int]:
    """Chips of one host along each axis: a host holds 2x2 chips; a smaller slice, what it has."""
    sides = _sides(grid)
    return min(2, sides[0]), min(2, sides[1]), 1


def slice_hosts(gen: str, grid: str) -> tuple[int, int]:
    """(hosts, chips per host) of one slice as GKE provisions it: 2-D chips (v5e, v6e) up to 8 on one
    host; otherwise 4 chips a host (fewer on a slice smaller than that)."""
    chips = math.prod(_sides(grid))
    per_host = chips if CHIPS[gen]["dims"] == 2 and chips <= 8 else min(4, chips)
    return chips // per_host, per_host


def torus_wrap(gen: str, grid: str) -> tuple[bool, bool, bool]:
    """Which axes of the chip grid close into rings, as the Cloud TPU pages describe the slices: a v4 or v5p
    slice built of whole 4x4x4 cubes is a 3-D torus, a smaller one an open mesh; of the 2-D chips only the
    full 16x16 pod closes its two axes. The TPU compiler picks its collectives by it (on 4x4x4 as an open
    mesh an FSDP gather compiles to an all-reduce of a zero-padded buffer, on the torus to an all-gather),
    so a plan for the wrong links reports traffic the slice will not have."""
    sides = _sides(grid)
    if CHIPS[gen]["dims"] == 3:
        return (all(side % 4 == 0 for side in sides),) * 3
    return (sides == [16, 16],) * 2 + (False,)
