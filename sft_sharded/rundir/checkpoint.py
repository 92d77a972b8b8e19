"""Checkpoints with orbax (OCDBT + zarr; nothing is a pickle).

A checkpoint `<run_dir>/checkpoints/<step>/` holds the train state (params, optimizer state, step), each
process's data-iterator state (`data/process_I-of-N.json`) and the resolved config. Saves are async and
atomic: orbax writes into a temporary directory and renames it when every process is done, so a kill
mid-save leaves the previous checkpoint as the newest. Restoring goes into the shardings of whatever mesh
the restoring trainer has, so a checkpoint moves between meshes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from sft_sharded.rundir import paths
from sft_sharded.data.pipeline import SavedDataState
from sft_sharded.errors import CheckpointNotSaved, UserError, first_line, is_full_disk
from sft_sharded.parallel.sharding import key_name
from sft_sharded.rundir.write_echoes import quiet_failed_reads

FINAL_PARAMS = "final_params"
CORRUPT_PREFIX = "corrupt-"  # a checkpoint that failed to restore, moved aside for inspection


class DataStateHandler(ocp.CheckpointHandler):
    """One JSON file per process with that process's data-iterator state."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> SavedDataState:
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        saved = sorted(directory.glob("process_*-of-*.json"), key=lambda p: int(p.name.split("_")[1].split("-")[0]))
        return SavedDataState(
            own=json.loads(own.read_text()) if own.exists() else None,
            first=json.loads(saved[0].read_text()) if saved else None,
            saved_by=int(saved[0].stem.rsplit("-of-", 1)[1]) if saved else 0,
            where=str(directory))

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        return None

    def close(self) -> None:
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    """Save every `every` steps, keep the newest `keep` (and every `keep_every`-th step, if set). `warn`
    prints one line for what the user should know (a corrupt checkpoint moved aside)."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, keep_every: int | None = None,
                 async_save: bool = True, warn: Callable[[str], None] = print):
        self.directory = paths.absolute(directory, "run_dir")
        self.every = every
        self.warn = warn
        self._in_flight: int | None = None  # the step an async save is writing
        self._failed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every, enable_async_checkpointing=async_save, create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler(),
                           "config": ocp.JsonCheckpointHandler()},
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether `save` at this step writes a checkpoint (without `force`)."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False) -> bool:
        """Start an async save (returns once device buffers are copied, so the state may then be donated).
        The previous save is confirmed first (orbax waits for it anyway); a save that fails, or would not
        fit on a local disk, raises `CheckpointNotSaved`."""
        if not force and not self.due(step):
            return False
        self.wait()
        self._check_space(step, state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataStateSave(data_state),
                                  config=ocp.args.JsonSave(config))
        self._in_flight = step
        try:
            saved = self._manager.save(step, args=args, force=force)
        except Exception as err:  # noqa: BLE001 - any failed write (disk full, permissions): one line
            raise self._not_saved(step, err) from None
        self._in_flight = step if saved else None
        return saved

    def _check_space(self, step: int, state: Any) -> None:
        """Refuse a save that cannot fit before it starts: a disk that fills mid-save leaves orbax's
        writer threads failing one by one (each logs its own traceback). Uncompressed size: an upper bound."""
        if paths.is_remote(self.directory):
            return
        need = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            self._failed = True
            raise CheckpointNotSaved(f"checkpoint {self.directory}/{step} was not saved: it needs up to "
                                     f"{need / 2**20:,.1f} MiB and its file system has {free / 2**20:,.1f} MiB "
                                     f"free; {self._kept()}; the run stopped")

    def _kept(self) -> str:
        steps = self.all_steps()
        return (f"the newest checkpoint, {self.directory}/{steps[-1]}, is intact" if steps
                else "no checkpoint was saved before it")

    def _not_saved(self, step: int | None, err: Exception | None) -> CheckpointNotSaved:
        """The error for a failed save, after removing every temporary checkpoint directory (the lock
        says no other run writes here; a half-written checkpoint of a full disk would keep the disk full,
        and the next resume would fail the same way)."""
        self._failed = True
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
            tmp.rmtree()
        why = "the disk is full" if is_full_disk(err) else first_line(err) if err is not None else "its write failed"
        if not paths.is_remote(self.directory):
            why += f" ({shutil.disk_usage(self.directory).free / 2**20:,.1f} MiB free on its file system)"
        return CheckpointNotSaved(f"checkpoint {self.directory}/{step} was not saved: {why}; its temporary "
                                  f"directory was removed and {self._kept()}; the run stopped")

    def restore_latest(self, abstract_state: Any) -> tuple[Any, SavedDataState, int] | None:
        """(state, data state, step) from the newest checkpoint that restores; None when there is none.

        A checkpoint that fails to restore (truncated, corrupt) while an older one restores is moved aside
        to `corrupt-<step>/` (kept for inspection, out of the step list, so the re-done steps save a good
        one in its place) with one line saying so. When none restores, nothing is moved (a failure of
        every checkpoint is more likely the storage or this version than the checkpoints) and the error
        names the directory.
        """
        steps = self.all_steps()
        if steps:
            self._check_same_model(steps[-1], abstract_state)
        failed: list[tuple[int, Exception]] = []
        for step in reversed(steps):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore())
            try:
                restored = self._manager.restore(step, args=args)
            except Exception as err:  # noqa: BLE001 - the previous checkpoint is tried; reported below
                quiet_failed_reads(f"{self.directory}/{step}")
                failed.append((step, err))
                continue
            for bad, err in failed:
                self._move_aside(bad, err)
            return restored["state"], restored["data"], step
        if failed:
            step, err = failed[0]
            raise UserError(f"{self.directory}: none of the checkpoints {steps} can be restored (step {step}: "
                            f"{first_line(err)}); nothing was moved or changed")
        return None

    def _move_aside(self, step: int, err: Exception) -> None:
        target = self.directory / f"{CORRUPT_PREFIX}{step}"
        n = 1
        while target.exists():  # an earlier corrupt copy of the same step stays too
            target, n = self.directory / f"{CORRUPT_PREFIX}{step}.{n}", n + 1
        (self.directory / str(step)).rename(target)
        self._manager.reload()
        self.warn(f"warning: checkpoint {self.directory}/{step} cannot be restored ({first_line(err)}); moved "
                  f"to {target}, training resumes from the one before it")

    def saved_config(self, step: int) -> dict:
        """The config a checkpoint was saved with (the run's config and its base fingerprint); {} when its
        config item cannot be read (reported: the state itself restored, so training goes on)."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"] or {}
        except Exception as err:  # noqa: BLE001 - reported; the base check then has nothing to compare
            self.warn(f"warning: checkpoint {self.directory}/{step}: its config cannot be read "
                      f"({first_line(err)}); the LoRA base and data.worker_count are not checked against it")
            return {}

    def _check_same_model(self, step: int, abstract_state: Any) -> None:
        """Refuse a checkpoint whose params have other names or shapes than the model's: it was made by
        another model, so neither it nor an older one can be resumed (and nothing may overwrite them).
        A checkpoint whose metadata cannot be read is left to `restore_latest`, which moves it aside."""
        try:
            saved_tree = self._manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - a corrupt checkpoint: restore_latest reports it and moves it aside
            return
        saved, wanted = _param_shapes(saved_tree), _param_shapes(abstract_state)
        if not saved or saved == wanted:
            return
        differ = [f"{k}: {saved[k]} saved, {wanted[k]} now" for k in sorted(saved.keys() & wanted.keys())
                  if saved[k] != wanted[k]]
        differ += [f"{k} only in the checkpoint" for k in sorted(saved.keys() - wanted.keys())]
        differ += [f"{k} only in this model" for k in sorted(wanted.keys() - saved.keys())]
        raise UserError(f"{self.directory}/{step} was saved by a different model ({len(differ)} parameter(s) "
                        f"differ: {'; '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}); use another "
                        "run_dir or the model config that made it. Nothing was changed.")

    def wait(self) -> None:
        """Block until the async save is written; `CheckpointNotSaved` when it failed."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as err:  # noqa: BLE001 - any failed write: one line
            raise self._not_saved(self._in_flight, err) from None
        step, self._in_flight = self._in_flight, None
        if step is not None and step not in self._manager.all_steps():
            # orbax's finalizing thread logs a failed async write and leaves the step out, raising nothing
            raise self._not_saved(step, None)

    def close(self) -> None:
        """Wait for the last save, then release orbax's threads (after a failed save: release only, the
        failure was raised already)."""
        try:
            if not self._failed:
                self.wait()
        finally:
            self._manager.close()


def _param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """"params/a/b" -> shape for the params of a TrainState or of its checkpoint metadata (a dict)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [key_name(e) for e in path]
        if names and names[0] == "params":
            out["/".join(names)] = tuple(leaf.shape)
    return out


def save_params(run_dir: str | Path, params: Any) -> Path:
    """The final params of a run, for `sft-sharded generate` and export."""
    path = paths.absolute(run_dir, "run_dir") / FINAL_PARAMS
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, params, force=True)
        ckpt.wait_until_finished()
    return path


def load_params(run_dir: str | Path, abstract_params: Any) -> Any:
    """Restore into `abstract_params` (ShapeDtypeStructs with the target shardings)."""
    path = paths.absolute(run_dir, "run_dir") / FINAL_PARAMS
    if not path.is_dir():
        raise FileNotFoundError(f"{run_dir}: no {FINAL_PARAMS}/ (train the run to the end first)")
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path, abstract_params)
