"""jax.distributed start-up, called once before anything touches a backend.

Which cluster, in order: explicit `SFT_COORDINATOR` / `SFT_NUM_PROCESSES` / `SFT_PROCESS_ID` (and optional
`SFT_LOCAL_DEVICE_IDS`, comma separated) as set by `launch/local_multiprocess.sh`; a SLURM job step with more
than one task (jax's own SLURM detection); a multi-host Cloud TPU VM (jax's own TPU detection); otherwise a
single process, where nothing is initialised.
"""

from __future__ import annotations

import os

import jax


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
