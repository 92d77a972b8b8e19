"""Memory, said before it runs out: what the compiled train step needs against what the machine has.

On a CPU the simulated devices share one host's RAM, so the step's per-device need counts once per local
device, and the kernel's OOM killer ends a run that asks for more without a word; on a GPU or TPU the
device's own limit applies. The check compiles the step ahead of time (the jitted call then reuses that
executable) and refuses in one line with both numbers and what would fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from sft_sharded.errors import UserError, first_line

GiB = 2**30


class OutOfMemory(UserError):
    """The step cannot fit (found before it ran), or XLA ran out of memory compiling or running it."""


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what the kernel can give without swapping); None elsewhere."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def step_need(compiled: Any) -> tuple[int, int]:
    """(bytes per device the step adds beyond its arguments, which already exist: outputs, temporaries,
    less what donation aliases; bytes of its arguments)."""
    m = compiled.memory_analysis()
    return m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes, m.argument_size_in_bytes


def check_fits(compiled: Any, devices: list, advice: str) -> str | None:
    """Refuse a step that needs more than there is; `advice` says what would fit (from the run's config).
    Returns a line with both numbers when it fits (None where the machine does not say what it has)."""
    extra, args = step_need(compiled)
    device = devices[0]
    if device.platform == "cpu":
        have = host_available_bytes()
        if have is None:
            return None
        need, where = extra * len(devices), (f"{extra / GiB:.2f} GiB per device x {len(devices)} simulated devices "
                                             f"sharing this host's RAM")
        what = f"the host has {have / GiB:.2f} GiB available"
    else:
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        have = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        need, where = extra, f"{extra / GiB:.2f} GiB per device beyond its {args / GiB:.2f} GiB of state and batch"
        what = f"{device.device_kind} has {have / GiB:.2f} GiB free"
    if need > have:
        raise OutOfMemory(f"the train step needs {need / GiB:.2f} GiB more memory ({where}), but {what}; "
                          f"it would be killed: {advice}")
    return f"memory: the train step needs {need / GiB:.2f} GiB more ({where}); {what}"


def check_first_step(trainer: Any, cfg: Any, state: Any, batch: Any) -> str | None:
    """`check_fits` for a run's first step, compiled here: the jitted call then reuses the executable."""
    compiled = trainer.lower("train", state, batch).compile()
    local = jax.local_devices()
    return check_fits(compiled, local, advice(cfg, len(local), local[0].platform))


def advice(cfg: Any, num_devices: int, platform: str) -> str:
    """What would make a run's step smaller, from its config."""
    tips = []
    if platform == "cpu" and num_devices > 1:
        tips.append("fewer simulated devices (simulate_devices=1 with mesh.data=1 mesh.fsdp=1 mesh.tensor=1)")
    if not cfg.lora.rank:
        tips.append("LoRA (lora.rank=8)")
    if cfg.data.batch_size > num_devices:
        tips.append(f"a smaller data.batch_size (now {cfg.data.batch_size}) or optim.grad_accum_steps")
    if cfg.model.remat != "full" or not cfg.model.scan_layers:
        # together: a scanned stack with full remat keeps one layer's widened weights alive at a time
        tips.append("model.remat=full model.scan_layers=true")
    tips.append(f"a shorter data.max_length (now {cfg.data.max_length})")
    return "try " + ", ".join(tips)


def is_xla_oom(err: BaseException) -> bool:
    """XLA's RESOURCE_EXHAUSTED at compile or run time (a jaxlib runtime error)."""
    return "RESOURCE_EXHAUSTED" in str(err) and type(err).__name__ in ("XlaRuntimeError", "JaxRuntimeError")


def describe_xla_oom(err: BaseException) -> str:
    return f"out of memory: {first_line(err, limit=300, with_type=False)}"
