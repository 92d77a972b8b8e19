"""Before jax starts: simulated CPU devices, and the CPU platform on a host with no accelerator; and what
the host's CPU can do (its instruction-set flags), for the compiler options of CPU steps.

XLA reads `--xla_force_host_platform_device_count` once, when jax starts its CPU backend, so this must run
before jax is imported (the CLI, the tests and the benchmarks call it). Where libtpu is installed (the
test extra installs it for `plan`'s TPU compiler) jax tries the TPU backend at start, and libtpu prints
about six lines of errors on a host without a TPU; `cpu_only_host` selects the CPU platform first there.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from pathlib import Path

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of this vendor (what jax itself looks for)

_FLAG = "--xla_force_host_platform_device_count"


def simulate_cpu_devices(count: int) -> bool:
    """Ask XLA for `count` host devices, keeping any other XLA_FLAGS; accelerators are unaffected.
    Returns False (and changes nothing) when jax is already imported or `count` is 0."""
    if count <= 0 or "jax" in sys.modules:
        return False
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_FLAG}={count}"])
    return True


def cpu_only_host() -> bool:
    """Set JAX_PLATFORMS=cpu when jax would otherwise try libtpu on a host without a TPU or an NVIDIA GPU
    (and the user has not chosen platforms). Returns whether it did; never after jax is imported."""
    if "jax" in sys.modules or os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return False
    if glob.glob("/dev/nvidia[0-9]*") or any(
            Path(v).read_text().strip() == _GOOGLE_PCI_VENDOR for v in glob.glob("/sys/bus/pci/devices/*/vendor")):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of the host's first CPU as Linux lists them ("avx512_bf16", "amx_bf16",
    ...); empty where the file does not exist (macOS, Windows) or lists none."""
    try:
        text = Path(cpuinfo).read_text()
    except FileNotFoundError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):  # x86; ARM calls them Features
            return frozenset(value.split())
    return frozenset()
