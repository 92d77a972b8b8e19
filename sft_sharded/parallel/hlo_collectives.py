"""Collectives of a compiled program, counted from its optimized HLO text: how many run per step and how
many bytes they move per device, so two systems' plans for the same TPU slice compare on traffic as well as
on memory and FLOPs (`sft-sharded plan`, benchmarks/tpu_side_by_side.py).

A collective inside a loop body (the scanned layers, the TPU compiler's windowed einsums) runs once per
iteration: each computation is weighted by the trip counts of the while loops that call it, from XLA's
`known_trip_count` where the compiler prints it (CPU), else from the loop condition `i < constant` (TPU).
An op's size is the larger of what it reads and what it writes on one device: the gathered array of an
all-gather, the unscattered input of a reduce-scatter, the buffer of an all-reduce.

Given the slice of each device (several TPU slices joined over the data-centre network), an op whose
device groups hold devices of more than one slice crosses DCN; its runs and bytes are counted apart too.
The groups are read in each of the forms XLA prints: explicit (`{{0,1},{2,3}}`), iota (`[2,4]<=[8]`,
`[4,2]<=[2,4]T(1,0)`), mesh axes (`mesh['axis_0'=2,'axis_1'=4] {'axis_0'}`), and a permute's pairs.
The TPU compiler builds one program per slice and sends what crosses slices to the runtime's DCN transport
(a host-transfer `send` tagged `_xla_megascale_transfer_type`): such a send counts as a DCN collective of
its kind, its buffer as its size.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from functools import cache

import numpy as np

# Asynchronous pairs are counted at their start; the *-done half moves nothing new.
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_STARTS = {f"{kind}-start": kind for kind in KINDS if kind not in ("reduce-scatter", "all-to-all")}
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
                "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
                "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_CALLEE = re.compile(r"\b(?:body|condition|calls|to_apply|branch_computations|called_computations)="
                     r"(\{[^}]*\}|%[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"\bcondition=%([\w.\-]+)")
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')
_EXPLICIT = re.compile(r"\b(?:replica_groups|source_target_pairs)=\{((?:\{[\d,]*\},?)*)\}")
_IOTA = re.compile(r"\breplica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH = re.compile(r"\breplica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                   r" \{([^}]*)\}")


def _iota(dims: str, perm: str | None) -> np.ndarray:
    ids = np.arange(_product(dims)).reshape([int(d) for d in dims.split(",")])
    return (ids.transpose([int(p) for p in perm.split(",")]) if perm else ids).reshape(-1)


def device_groups(attributes: str) -> list[list[int]] | None:
    """The groups of logical device ids a collective runs over (None: every device, or a form not read)."""
    if mesh := _MESH.search(attributes):
        axes, dims, perm, over = mesh.groups()
        names = re.findall(r"'([^']+)'=(\d+)", axes)
        shape = [int(size) for _, size in names]
        ids = (_iota(dims, perm) if dims else np.arange(int(np.prod(shape)))).reshape(shape)
        inside = [i for i, (name, _) in enumerate(names) if f"'{name}'" in over]
        outside = [i for i in range(len(shape)) if i not in inside]
        ids = ids.transpose(outside + inside)
        return ids.reshape(-1, int(np.prod([shape[i] for i in inside]))).tolist()
    if iota := _IOTA.search(attributes):
        groups, size, dims, perm = iota.groups()
        return _iota(dims, perm).reshape(int(groups), int(size)).tolist()
    if (explicit := _EXPLICIT.search(attributes)) and explicit.group(1):
        return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))]
    return None


def crosses_slices(groups: list[list[int]] | None, slice_of: Sequence[int]) -> bool:
    """Whether any group holds devices of more than one slice (no groups: all devices)."""
    if groups is None:
        return len(set(slice_of)) > 1
    return any(len({slice_of[i] for i in group}) > 1 for group in groups)


def type_bytes(hlo_type: str) -> float:
    """Bytes of every array in an HLO type (an array or a tuple of arrays)."""
    return sum(_DTYPE_BYTES[dtype] * _product(dims) for dtype, dims in _ARRAY.findall(hlo_type))


def _product(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def _split_operands(rest: str) -> tuple[str, str]:
    """'a, b), attrs' -> ('a, b', 'attrs'): the operand list ends at the parenthesis that closes it."""
    depth = 1
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


def collectives(hlo_text: str, slice_of: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
    """{kind: {"count": runs per step, "bytes": bytes per device per step}} for each kind in `KINDS`; with
    `slice_of` (the slice of each logical device id) also "dcn_count" and "dcn_bytes", the part that
    crosses slices."""
    sizes: dict[str, float] = {}
    ops: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)  # computation -> (result, op, operands, attrs)
    calls: dict[str, list[tuple[str, int | str]]] = defaultdict(list)  # callee -> [(caller, trips or condition)]
    constants: dict[str, int] = {}
    bounds: dict[str, int] = {}  # loop condition -> n of its `i < n`
    entry, computation = None, None
    for line in hlo_text.splitlines():
        line = re.sub(r"/\*[^*]*\*/", "", line)
        if header := _HEADER.match(line):
            computation = header.group(1)
            entry = computation if line.startswith("ENTRY") else entry
            continue
        if computation is None or not (inst := _INSTRUCTION.match(line)):
            continue
        name, result, opcode, rest = inst.groups()
        operands, attributes = _split_operands(rest)
        sizes[name] = type_bytes(result)
        ops[computation].append((name, opcode, operands, attributes))
        if opcode == "constant" and operands.strip().isdigit():
            constants[name] = int(operands)
        if opcode == "compare" and "direction=LT" in attributes and line.lstrip().startswith("ROOT"):
            bound = [constants[o] for o in re.findall(r"%([\w.\-]+)", operands) if o in constants]
            bounds[computation] = bound[0] if len(bound) == 1 else 1
        if opcode.endswith(("-done", "-update")):
            continue  # an async op's done half names the same computation as its start
        trips = _TRIP_COUNT.search(attributes) if opcode == "while" else None
        condition = _CONDITION.search(attributes) if opcode == "while" else None
        for group in _CALLEE.findall(attributes):
            for callee in re.findall(r"%([\w.\-]+)", group):
                times = int(trips.group(1)) if trips else condition.group(1) if condition else 1
                calls[callee].append((computation, times))

    @cache
    def runs(comp: str) -> int:
        return 1 if comp == entry else sum(runs(caller) * (bounds.get(times, 1) if isinstance(times, str) else times)
                                           for caller, times in calls.get(comp, ()))

    totals = {kind: {"count": 0, "bytes": 0.0, **({"dcn_count": 0, "dcn_bytes": 0.0} if slice_of else {})}
              for kind in KINDS}
    for comp, instructions in ops.items():
        for name, opcode, operands, attributes in instructions:
            megascale = _MEGASCALE.search(attributes) if opcode == "send" and slice_of else None
            kind = megascale.group(1).lower().replace("_", "-") if megascale else _STARTS.get(opcode, opcode)
            if kind not in totals:
                continue
            read = sum(sizes.get(o, 0.0) for o in re.findall(r"%([\w.\-]+)", operands))
            # a start's tuple repeats its inputs; a send's result is its buffer again
            written = 0.0 if megascale else sizes[name] - (read if opcode in _STARTS else 0.0)
            totals[kind]["count"] += runs(comp)
            totals[kind]["bytes"] += runs(comp) * max(read, written)
            if megascale or (slice_of and crosses_slices(device_groups(attributes), slice_of)):
                totals[kind]["dcn_count"] += runs(comp)
                totals[kind]["dcn_bytes"] += runs(comp) * max(read, written)
    return totals


def report(totals: dict[str, dict[str, float]]) -> str:
    """One line: count and GiB per kind, then the sum."""
    parts = [f"{kind} {t['count']} x {t['bytes'] / 2**30:.2f} GiB" for kind, t in totals.items() if t["count"]]
    total = sum(t["bytes"] for t in totals.values()) / 2**30
    line = f"collectives per chip per step: {', '.join(parts) or 'none'}; total {total:.2f} GiB"
    if any("dcn_bytes" in t for t in totals.values()):
        mib = 2**20  # DCN in MiB: a slice's whole gradient, often far below a GiB per chip
        dcn = [f"{kind} {t['dcn_count']} x {t['dcn_bytes'] / mib:.2f} MiB" for kind, t in totals.items()
               if t.get("dcn_count")]
        dcn_total = sum(t.get("dcn_bytes", 0.0) for t in totals.values())
        line += (f"\n  across slices (DCN): {', '.join(dcn) or 'none'}; DCN {dcn_total / mib:.2f} MiB, "
                 f"inside slices (ICI) {total - dcn_total / 2**30:.2f} GiB per chip per step")
    return line
