"""jax.distributed start-up, called once before anything touches a backend.

Which cluster, in order: explicit `SFT_COORDINATOR` / `SFT_NUM_PROCESSES` / `SFT_PROCESS_ID` (and optional
`SFT_LOCAL_DEVICE_IDS`, comma separated) as set by `launch/local_multiprocess.sh`; a SLURM job step with more
than one task (jax's own SLURM detection); a multi-host Cloud TPU VM (jax's own TPU detection); otherwise a
single process, where nothing is initialised.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

from sft_sharded.errors import UserError

T = TypeVar("T")


def cluster_kind(env=os.environ) -> str:
    if env.get("SFT_COORDINATOR"):
        return "explicit"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return "single"


def initialize(env=os.environ) -> str:
    """Start jax.distributed for the detected cluster; returns its kind."""
    kind = cluster_kind(env)
    if kind == "explicit":
        missing = [k for k in ("SFT_NUM_PROCESSES", "SFT_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ValueError(f"SFT_COORDINATOR is set but {', '.join(missing)} is not")
        local = env.get("SFT_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=env["SFT_COORDINATOR"], num_processes=int(env["SFT_NUM_PROCESSES"]),
            process_id=int(env["SFT_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
        )
    elif kind in ("slurm", "tpu"):
        jax.distributed.initialize()  # jax reads the SLURM / TPU metadata itself
    return kind


def describe() -> str:
    return f"process {jax.process_index()} of {jax.process_count()}"


_TEXT_BYTES = 4096  # a shared message's most bytes (UTF-8; longer ones are cut)


def _share_text(text: str) -> str:
    """Process 0's `text`, on every process (a collective: every process calls it)."""
    from jax.experimental import multihost_utils

    data = np.zeros(_TEXT_BYTES, np.uint8)
    raw = text.encode()[:_TEXT_BYTES]
    data[:len(raw)] = np.frombuffer(raw, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(shared).rstrip(b"\0").decode(errors="replace")


def on_first_process(fn: Callable[[], T]) -> T | None:
    """`fn()` on process 0 only (it returns None elsewhere), with its UserError raised on every process:
    a refusal only process 0 can judge (the run directory's lock, the trackers) then stops the whole job
    at once with the same line, where the other processes would otherwise wait in their first collective
    until the coordinator's heartbeat gave up. Every process must call it at the same point."""
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except UserError as err:
            error = err
    message = "" if error is None else str(error)
    if jax.process_count() > 1:
        message = _share_text(message)
    if error is not None:
        raise error
    if message:
        raise UserError(message)
    return result
