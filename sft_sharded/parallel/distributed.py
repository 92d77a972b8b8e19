"""jax.distributed start-up, called once before anything touches a backend.

Which cluster, in order: explicit `SFT_COORDINATOR` / `SFT_NUM_PROCESSES` / `SFT_PROCESS_ID` (and optional
`SFT_LOCAL_DEVICE_IDS`, comma separated) as set by `launch/local_multiprocess.sh` and the Ray launcher; a
JobSet pod gives `SFT_SLICE_ID`, `SFT_HOSTS_PER_SLICE` and `SFT_HOST_INDEX` instead of `SFT_PROCESS_ID`
(Kubernetes can copy the job and pod indices into the environment but not multiply them); a SLURM job step with more
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


_SLICE_KEYS = ("SFT_SLICE_ID", "SFT_HOSTS_PER_SLICE", "SFT_HOST_INDEX")


def explicit_cluster(env=os.environ) -> dict[str, int | str]:
    """{coordinator, num_processes, process_id, slice_id} of an explicit cluster's environment."""
    def number(key: str) -> int:
        try:
            return int(env[key])
        except ValueError:
            raise UserError(f"{key}={env[key]!r} must be an integer") from None

    wanted = ("SFT_NUM_PROCESSES",) + (_SLICE_KEYS if "SFT_PROCESS_ID" not in env else ("SFT_PROCESS_ID",))
    missing = [k for k in wanted if not env.get(k)]
    if missing:
        raise UserError(f"SFT_COORDINATOR is set but {', '.join(missing)} is not")
    if "SFT_PROCESS_ID" in env:
        process_id = number("SFT_PROCESS_ID")
        slice_id = number("SFT_SLICE_ID") if env.get("SFT_SLICE_ID") else 0
    else:
        slice_id = number("SFT_SLICE_ID")
        process_id = slice_id * number("SFT_HOSTS_PER_SLICE") + number("SFT_HOST_INDEX")
    num_processes = number("SFT_NUM_PROCESSES")
    if not 0 <= process_id < num_processes:
        raise UserError(f"process id {process_id} (from the SFT_* environment) is not below SFT_NUM_PROCESSES="
                        f"{num_processes}")
    return {"coordinator": env["SFT_COORDINATOR"], "num_processes": num_processes, "process_id": process_id,
            "slice_id": slice_id}


def initialize(env=os.environ) -> str:
    """Start jax.distributed for the detected cluster; returns its kind."""
    kind = cluster_kind(env)
    if kind == "explicit":
        cluster = explicit_cluster(env)
        local = env.get("SFT_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=cluster["coordinator"], num_processes=cluster["num_processes"],
            process_id=cluster["process_id"],
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
