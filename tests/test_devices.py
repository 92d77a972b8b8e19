"""The host CPU's flags as /proc/cpuinfo lists them, which choose the CPU steps' compiler options."""

import os

from sft_sharded.parallel.devices import cpu_flags, simulate_cpu_devices

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse2
"""
ARM = "processor\t: 0\nBogoMIPS\t: 48.00\nFeatures\t: fp asimd bf16 sme\nCPU implementer\t: 0x61\n"


def test_cpu_flags_of_the_first_cpu(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86)
    assert cpu_flags(str(path)) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    path.write_text(ARM)
    assert cpu_flags(str(path)) == {"fp", "asimd", "bf16", "sme"}


def test_cpu_flags_are_empty_without_the_file_or_a_flags_line(tmp_path):
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: something\n")
    assert cpu_flags(str(path)) == frozenset()


def test_simulated_devices_are_not_asked_for_once_jax_is_imported(monkeypatch):
    import jax  # noqa: F401 (the test process has jax already; this says so)

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert simulate_cpu_devices(8) is False
    assert simulate_cpu_devices(0) is False
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"  # unchanged: XLA has read its flags already
