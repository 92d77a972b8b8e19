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
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from sft_sharded import paths
from sft_sharded.data.pipeline import SavedDataState
from sft_sharded.errors import UserError
from sft_sharded.sharding import key_name

log = logging.getLogger(__name__)
FINAL_PARAMS = "final_params"


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
    """Save every `every` steps, keep the newest `keep` (and every `keep_every`-th step, if set)."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, keep_every: int | None = None,
                 async_save: bool = True):
        self.directory = paths.absolute(directory, "run_dir")
        self.every = every
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
        """Start an async save (returns once device buffers are copied, so the state may then be donated)."""
        if not force and not self.due(step):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataStateSave(data_state),
                                  config=ocp.args.JsonSave(config))
        return self._manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, SavedDataState, int] | None:
        """(state, data state, step) from the newest checkpoint that restores; None when there is none.

        A checkpoint that fails to restore (truncated, corrupt) is reported and the previous one is tried;
        when checkpoints exist but none restores, the error names the directory.
        """
        steps = self.all_steps()
        if steps:
            self._check_same_model(steps[-1], abstract_state)
        failures = []
        for step in reversed(steps):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore())
            try:
                restored = self._manager.restore(step, args=args)
            except Exception as err:  # noqa: BLE001 - reported, then the previous checkpoint is tried
                log.warning("checkpoint %s/%d is unusable (%s: %s); trying the previous one",
                            self.directory, step, type(err).__name__, err)
                failures.append(f"step {step}: {type(err).__name__}: {err}")
                continue
            return restored["state"], restored["data"], step
        if failures:
            raise RuntimeError(f"{self.directory}: no usable checkpoint among steps {steps}: " + "; ".join(failures))
        return None

    def saved_config(self, step: int) -> dict:
        """The config a checkpoint was saved with (the run's config and its base fingerprint); {} when its
        config item cannot be read (reported: the state itself restored, so training goes on)."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"] or {}
        except Exception as err:  # noqa: BLE001 - reported; the base check then has nothing to compare
            log.warning("checkpoint %s/%d: config unreadable (%s: %s)", self.directory, step, type(err).__name__, err)
            return {}

    def _check_same_model(self, step: int, abstract_state: Any) -> None:
        """Refuse a checkpoint whose params have other names or shapes than the model's: it was made by
        another model, so neither it nor an older one can be resumed (and nothing may overwrite them).
        A checkpoint whose metadata cannot be read is left to `restore_latest`'s fallback."""
        try:
            saved_tree = self._manager.item_metadata(step)["state"]
        except Exception as err:  # noqa: BLE001 - a corrupt checkpoint: restore reports it and falls back
            log.warning("checkpoint %s/%d: metadata unreadable (%s)", self.directory, step, err)
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
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
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
