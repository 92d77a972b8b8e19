"""Simulated CPU devices: XLA reads `--xla_force_host_platform_device_count` once, when jax starts its
CPU backend, so this must run before jax is imported (the CLI, the tests and the benchmarks call it)."""

from __future__ import annotations

import os
import sys

_FLAG = "--xla_force_host_platform_device_count"


def simulate_cpu_devices(count: int) -> bool:
    """Ask XLA for `count` host devices, keeping any other XLA_FLAGS; accelerators are unaffected.
    Returns False (and changes nothing) when jax is already imported or `count` is 0."""
    if count <= 0 or "jax" in sys.modules:
        return False
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_FLAG}={count}"])
    return True
