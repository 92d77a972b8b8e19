"""Where a compiled step's time goes, from a jax profiler trace.

Each kernel the trace records carries the HLO instruction it ran (`hlo_op`); the optimized HLO keeps, for
each instruction, the op name of the jax operation it came from (jax's name stack: the model's modules,
the trainer's `loss`, `optimizer` and `metrics` scopes, `jvp` for the forward pass and `transpose` for the
backward pass). A kernel's time is attributed by that name. On an accelerator the device's idle time
between the kernels of each step (launch gaps, waits inside the step) is a part of its own.

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        ...  # the steps, each waited for
    parts = breakdown(load_trace(log_dir), compiled.as_text())
    print(format_table(parts))
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# A loop's or a branch's own event spans its body, whose kernels may run on other threads (XLA:CPU): its
# time is its kernels', counted there, so its event counts for nothing itself.
_CONTROL_FLOW = re.compile(r"^(?:while|conditional|call)(?:\.\d+)?$")
# (part, substrings of the op name), the first match wins; a scope differentiated as a whole shows as
# `jvp(loss)`. The trainer's scopes hold no model module; in the model, a norm inside a block (`attn_norm`,
# `q_norm`) counts as a norm, not as its block. Parts in PER_PASS are split into forward and backward.
PARTS = (("optimizer", ("/optimizer",)), ("metrics", ("/metrics",)), ("loss", ("/loss", "(loss)")),
         ("norms", ("norm/", "norm)")), ("attention", ("_attend", "attention")),
         ("attention projections", ("/attn",)), ("mlp", ("/mlp", "/moe", "/experts")), ("embedding", ("_embed",)),
         ("layer stacking", ("dynamic_index_in_dim", "dynamic_update_index_in_dim")))
PER_PASS = {"attention", "attention projections", "mlp", "norms", "embedding", "loss"}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+[\w\-]+\(([^)]*)\)(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Breakdown:
    seconds: dict[str, float]  # part -> kernel seconds (self time), summed over every device thread or stream
    idle_s: float | None  # accelerators: time inside each step's span of kernels not covered by any kernel
    span_s: float  # first kernel's start to last kernel's end
    unattributed: dict[str, float]  # kernels whose instruction the HLO does not name, by kernel name


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> op name, for every instruction of an HLO module's text that has one. An
    instruction without one (a fusion, a convert the compiler added) takes the op name of the computation
    it calls (its root's first), else of its first operand that has one."""
    own, calls, operands, computations = {}, {}, {}, collections.defaultdict(list)
    computation = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        root, name, args, rest = found.groups()
        op_name = _OP_NAME.search(rest)
        own[name] = op_name.group(1) if op_name else None
        calls[name] = _CALLS.findall(rest)
        operands[name] = re.findall(r"%([\w.\-]+)", args)
        if computation is not None:
            computations[computation].insert(0 if root else len(computations[computation]), name)

    def resolve(name: str, depth: int = 0) -> str | None:
        if own.get(name) or depth > 4:
            return own.get(name)
        inside = (resolve(n, depth + 1) for c in calls.get(name, ()) for n in computations.get(c, ()))
        around = (resolve(n, depth + 1) for n in operands.get(name, ()))
        return next((found for found in (*inside, *around) if found), None)

    return {name: op_name for name in own if (op_name := resolve(name))}


def part_of(op: str, op_name: str | None) -> str:
    """The part of the step an instruction belongs to (see PARTS)."""
    if op.startswith(COLLECTIVES):
        return "collectives"
    if not op_name:
        return "unattributed"
    part = next((name for name, needles in PARTS if any(n in op_name for n in needles)), "other")
    if part in PER_PASS:
        direction = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else None
        return f"{part} ({direction})" if direction else part
    return part


def load_trace(log_dir: str) -> list[dict]:
    """The events of the newest trace that `jax.profiler.trace(log_dir, create_perfetto_trace=True)` wrote."""
    paths = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    if not paths:
        raise FileNotFoundError(f"{log_dir}: no perfetto_trace.json.gz (trace with create_perfetto_trace=True)")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """(kernel event, its time less the kernels nested in it) for one thread's kernel events: a loop's
    event encloses its body's kernels, whose time is theirs; other events nested in a kernel (waits at a
    rendezvous) stay in its time."""
    events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
    child_time = collections.defaultdict(float)
    stack: list[dict] = []
    for event in events:
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= event["ts"]:
            stack.pop()
        if stack:
            child_time[id(stack[-1])] += event["dur"]
        stack.append(event)
    return [(e, e["dur"] - child_time[id(e)]) for e in events]


def _covered(intervals: list[tuple[float, float]]) -> float:
    covered, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            covered += stop - max(start, end)
            end = stop
    return covered


def _launches(events: list[dict], module: str | None, devices: set) -> list[float]:
    """When the host launched the program, once per step: its "...Execute (module)" events (several per
    step where each device has its own), those less than a millisecond after the previous taken as one."""
    starts = sorted(e["ts"] for e in events if e.get("ph") == "X" and e["pid"] not in devices
                    and "Execute" in e.get("name", "") and e["name"].endswith(f"({module})"))
    launches: list[float] = []
    for start in starts:
        if not launches or start - launches[-1] >= 1000:
            launches.append(start)
    return launches


def _idle(spans: list[tuple[float, float]], launches: list[float]) -> float:
    """Time between a device's kernels within each step: the kernels are split into steps at the host's
    launches of the program, so the host's time between steps (waiting for the result, starting the next
    step, which training overlaps with the device) is not counted."""
    steps = collections.defaultdict(list)
    for start, stop in spans:
        steps[sum(launch <= start for launch in launches)].append((start, stop))
    return sum(max(b for _, b in group) - min(a for a, _ in group) - _covered(group) for group in steps.values())


def breakdown(events: list[dict], hlo_text: str, module: str | None = None) -> Breakdown:
    """Kernel time per part of the step for the trace's kernels of `module` (the HLO module's name; default:
    the one named in `hlo_text`)."""
    names = op_names(hlo_text)
    if module is None:
        found = re.search(r"^HloModule\s+([\w.\-]+)", hlo_text, re.M)
        module = found.group(1) if found else None
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = collections.defaultdict(list)
    for e in events:
        args = e.get("args") or {}
        # On an accelerator every event is device work (a kernel replayed from a CUDA graph may carry no
        # `hlo_op`: unattributed, but busy); on the host only XLA's kernels count. A kernel without
        # `hlo_module` is taken to be the module's.
        kernel = "hlo_op" in args or "/device:" in processes.get(e.get("pid"), "")
        if e.get("ph") == "X" and kernel and (module is None or args.get("hlo_module", module) == module):
            threads[(e["pid"], e["tid"])].append(e)
    seconds, unattributed = collections.defaultdict(float), collections.defaultdict(float)
    per_device = collections.defaultdict(list)  # an accelerator's kernels over all its streams
    for (pid, _), kernels in threads.items():
        for event, self_us in _self_times(kernels):
            op = (event.get("args") or {}).get("hlo_op", "")
            if _CONTROL_FLOW.match(op):
                continue
            part = part_of(op, names.get(op))
            seconds[part] += self_us / 1e6
            if part == "unattributed":
                unattributed[event["name"]] += self_us / 1e6
        if "/device:" in processes.get(pid, ""):
            per_device[pid] += [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    idle = None
    if per_device:
        launches = _launches(events, module, set(per_device))
        idle = sum(_idle(spans, launches) for spans in per_device.values()) / 1e6
    kernels = [e for group in threads.values() for e in group]
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / 1e6 if kernels else 0.0
    return Breakdown(dict(seconds), idle, span, dict(unattributed))


def format_table(parts: Breakdown, steps: int = 1) -> str:
    """Seconds per step and share of each part, largest first (idle included where measured)."""
    rows = dict(parts.seconds)
    if parts.idle_s is not None:
        rows["idle (between kernels)"] = parts.idle_s
    total = sum(rows.values()) or 1.0
    lines = [f"{'part':<32} {'s per step':>10} {'share':>6}"]
    for part, seconds in sorted(rows.items(), key=lambda kv: -kv[1]):
        lines.append(f"{part:<32} {seconds / steps:>10.4f} {seconds / total:>6.1%}")
    lines.append(f"{'all':<32} {total / steps:>10.4f}")
    return "\n".join(lines)
