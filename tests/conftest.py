"""8 simulated CPU devices, set before jax is imported anywhere in the test session."""

import atexit
import importlib.metadata
import os
import shutil
import tempfile

# One persistent XLA compilation cache per test session, shared with the CLI subprocesses the tests start
# (they inherit the environment): many of them compile the same tiny train step. A fresh directory each
# session, so nothing carries over from one run of the suite to the next, removed when the session ends
# (each run left about 6 MB per worker behind).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sft-sharded-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"])
# The subprocesses cache every executable, however fast it compiled: a 16-step run compiles about 70, most in
# under half a second, and the tests start dozens of runs of a few configs (a run found in the cache: 22.1 ->
# 20.5 s, mean of 4 alternating). The test process itself caches only what took 0.5 s or more (below).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# SFT_SHARDED_TEST_PLATFORM=gpu (benchmarks/gpu_check.sh) keeps the real accelerator for the tests that
# need one (the cuDNN attention tests); everything else assumes the 8 simulated CPU devices.
ON_CPU = os.environ.get("SFT_SHARDED_TEST_PLATFORM", "cpu") == "cpu"

# The tests compile hundreds of tiny steps and run each a few times, where XLA:CPU's LLVM optimizations cost
# more compile time than they save (the sharded mixtral parity test: 59 s -> 28 s, the whole suite 29 -> 18
# minutes on 2 cores). In this process only: XLA reads the flags once, when jax starts its backend, and they
# are taken out of the environment again, so the CLI subprocesses the tests start (the end-to-end runs of
# 60 steps and more, slower without the optimizations) compile with XLA's defaults, as users do. jax keys its
# compilation cache on XLA_FLAGS as it reads them at compile time, so this process keeps its executables in
# a cache directory of its own, apart from theirs.
FAST_COMPILE_FLAGS = ["--xla_backend_optimization_level=0"]
if importlib.metadata.version("jaxlib").startswith("0.10."):
    # Its fusion emitters compile slower still; jaxlib 0.12 has no such flag, and an unknown flag in
    # XLA_FLAGS aborts the process, so it goes only where it was seen to exist.
    FAST_COMPILE_FLAGS.append("--xla_cpu_use_fusion_emitters=false")
if ON_CPU:
    from sft_sharded.parallel.devices import simulate_cpu_devices

    simulate_cpu_devices(8)
    os.environ["JAX_PLATFORMS"] = "cpu"
    _flags_for_subprocesses = os.environ["XLA_FLAGS"]
    os.environ["XLA_FLAGS"] = " ".join([*FAST_COMPILE_FLAGS, _flags_for_subprocesses])

import jax  # noqa: E402
import pytest  # noqa: E402

from sft_sharded.models import DecoderConfig  # noqa: E402

assert not ON_CPU or jax.device_count() == 8, jax.devices()
if ON_CPU:
    os.environ["XLA_FLAGS"] = _flags_for_subprocesses
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"], "fast-compile"))
else:
    # GPUs multiply float32 in TF32 by default; the float64 references need full float32 products.
    jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # this process's shapes are mostly one-off


# GQA (4 query heads on 2 kv heads), untied, small enough for exact float32 comparisons.
TINY = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, init_std=0.2)


@pytest.fixture
def tiny_config() -> DecoderConfig:
    return TINY


@pytest.fixture(autouse=True)
def _fresh_save_echo_filters():
    """A `train` whose save failed keeps its filters on the absl and asyncio loggers and its unraisable
    hook for the rest of its process (write_echoes.py); a test process runs many commands, so each test
    starts and ends with the loggers and hook it found."""
    import logging
    import sys

    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    filters, hook = [list(logger.filters) for logger in loggers], sys.unraisablehook
    yield
    sys.unraisablehook = hook
    for logger, kept in zip(loggers, filters):
        logger.filters[:] = kept
