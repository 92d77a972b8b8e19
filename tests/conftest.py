"""8 simulated CPU devices, set before jax is imported anywhere in the test session."""

import atexit
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
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# SFT_SHARDED_TEST_PLATFORM=gpu (benchmarks/gpu_check.sh) keeps the real accelerator for the tests that
# need one (the cuDNN attention tests); everything else assumes the 8 simulated CPU devices.
ON_CPU = os.environ.get("SFT_SHARDED_TEST_PLATFORM", "cpu") == "cpu"
if ON_CPU:
    from sft_sharded.parallel.devices import simulate_cpu_devices

    simulate_cpu_devices(8)
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

from sft_sharded.models import DecoderConfig  # noqa: E402

assert not ON_CPU or jax.device_count() == 8, jax.devices()
if not ON_CPU:
    # GPUs multiply float32 in TF32 by default; the float64 references need full float32 products.
    jax.config.update("jax_default_matmul_precision", "highest")


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
