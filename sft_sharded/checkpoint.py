"""Checkpoints with orbax (OCDBT + zarr, never pickles). For now: the final params of a run, restored into
any mesh's shardings for `sft-sharded generate`; full train-state checkpoints and resume build on this."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

FINAL_PARAMS = "final_params"


def save_params(run_dir: str | Path, params: Any) -> Path:
    path = (Path(run_dir) / FINAL_PARAMS).absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, params, force=True)
        ckpt.wait_until_finished()
    return path


def load_params(run_dir: str | Path, abstract_params: Any) -> Any:
    """Restore into `abstract_params` (ShapeDtypeStructs with the target shardings)."""
    path = (Path(run_dir) / FINAL_PARAMS).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"{run_dir}: no {FINAL_PARAMS}/ (train the run to the end first)")
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path, abstract_params)
