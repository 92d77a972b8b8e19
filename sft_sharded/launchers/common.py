"""What every launcher shares: the CLI's exit status for a user's mistake, and the environment of the
multi-slice TPU runtime (libtpu reads it to reach the other slices over DCN)."""

from __future__ import annotations

from sft_sharded.errors import UserError

USER_ERROR_EXIT = UserError.exit_code  # a bad key, a missing file: restarting cannot help
MEGASCALE_PORT = 8080  # the multi-slice runtime's DCN transport


def megascale_env(coordinator_host: str, slices: int, slice_id: str | int) -> dict[str, str]:
    """MEGASCALE_* for a process of slice `slice_id` of `slices` (none for a single slice)."""
    if slices <= 1:
        return {}
    return {"MEGASCALE_COORDINATOR_ADDRESS": coordinator_host, "MEGASCALE_NUM_SLICES": str(slices),
            "MEGASCALE_SLICE_ID": str(slice_id), "MEGASCALE_PORT": str(MEGASCALE_PORT)}
