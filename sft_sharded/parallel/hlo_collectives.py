"""Collectives of a compiled program, counted from its optimized HLO text: how many run per step and how
many bytes they move per device, so two systems' plans for the same TPU slice compare on traffic as well as
on memory and FLOPs (`sft-sharded plan`, benchmarks/tpu_side_by_side.py).

A collective inside a loop body (the scanned layers, the TPU compiler's windowed einsums) runs once per
iteration: each computation is weighted by the trip counts of the while loops that call it, from XLA's
`known_trip_count` where the compiler prints it (CPU), else from the loop condition `i < constant` (TPU).
An op's size is the larger of what it reads and what it writes on one device: the gathered array of an
all-gather, the unscattered input of a reduce-scatter, the buffer of an all-reduce.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import cache

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


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count": runs per step, "bytes": bytes per device per step}} for each kind in `KINDS`."""
    sizes: dict[str, float] = {}
    ops: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # computation -> (result, opcode, operands)
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
        ops[computation].append((name, opcode, operands))
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

    totals = {kind: {"count": 0, "bytes": 0.0} for kind in KINDS}
    for comp, instructions in ops.items():
        for name, opcode, operands in instructions:
            kind = _STARTS.get(opcode, opcode)
            if kind not in totals:
                continue
            read = sum(sizes.get(o, 0.0) for o in re.findall(r"%([\w.\-]+)", operands))
            written = sizes[name] - (read if opcode in _STARTS else 0.0)  # a start's tuple repeats its inputs
            totals[kind]["count"] += runs(comp)
            totals[kind]["bytes"] += runs(comp) * max(read, written)
    return totals


def report(totals: dict[str, dict[str, float]]) -> str:
    """One line: count and GiB per kind, then the sum."""
    parts = [f"{kind} {t['count']} x {t['bytes'] / 2**30:.2f} GiB" for kind, t in totals.items() if t["count"]]
    total = sum(t["bytes"] for t in totals.values()) / 2**30
    return f"collectives per chip per step: {', '.join(parts) or 'none'}; total {total:.2f} GiB"
