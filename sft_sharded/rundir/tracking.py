"""Weights & Biases and MLflow beside metrics.jsonl and TensorBoard: the config, every logged metric and
`loss.png` as an artifact. Only process 0 creates trackers (`MetricsWriter` is disabled elsewhere). Each
tracker keeps its run id in the run directory, so a resumed run continues the same W&B / MLflow run
instead of starting a second one. Both libraries are optional extras, imported only when enabled."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

from etils import epath

from sft_sharded.config import MlflowConfig, TrainConfig, WandbConfig, to_dict
from sft_sharded.errors import UserError


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"track.{extra}.enabled=true needs the {extra} package: pip install 'sft_sharded[{extra}]'"
                        ) from None


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _run_id(run_dir: Path, name: str) -> str | None:
    path = run_dir / name
    return path.read_text().strip() if path.is_file() else None


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


_WANDB_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                "disabled": "disabled"}


def wandb_mode(cfg: WandbConfig) -> str:
    """online, offline or disabled: `track.wandb.mode` when set, else W&B's own `WANDB_MODE` (whose `dryrun`
    is offline), else online."""
    if cfg.mode is not None:
        return cfg.mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env and env not in _WANDB_MODES:
        raise UserError(f"WANDB_MODE={env!r} (environment) is not one of {sorted(_WANDB_MODES)}")
    return _WANDB_MODES.get(env, "online")


def check_trackers(cfg: TrainConfig) -> list[str]:
    """The start-up check of `track.*` (packages installed, modes known), before the run directory is
    written; lines for the user about what is off."""
    lines = []
    if cfg.track.wandb.enabled:
        if wandb_mode(cfg.track.wandb) == "disabled":
            source = "track.wandb.mode" if cfg.track.wandb.mode else "WANDB_MODE"
            lines.append(f"W&B is off: {source}=disabled (track.wandb.enabled=true)")
        else:
            _require("wandb", "wandb")
    if cfg.track.mlflow.enabled:
        _require("mlflow", "mlflow")
    return lines


class WandbTracker:
    def __init__(self, cfg: WandbConfig, run_dir: epath.Path, config: dict[str, Any], local_dir: Path):
        wandb = _require("wandb", "wandb")
        run_id = _run_id(run_dir, "wandb_run_id") or uuid.uuid4().hex[:8]
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, id=run_id, resume="allow",
                              mode=wandb_mode(cfg), dir=str(local_dir), config=config)
        (run_dir / "wandb_run_id").write_text(run_id)
        self._wandb = wandb

    def log(self, record: dict) -> None:
        self.run.log(_numbers(record), step=int(record["step"]))

    def close(self, loss_png: Path) -> None:
        if loss_png.is_file():
            artifact = self._wandb.Artifact(f"loss-{self.run.id}", type="plot")
            artifact.add_file(str(loss_png))
            self.run.log_artifact(artifact)
        self.run.finish()


class MlflowTracker:
    def __init__(self, cfg: MlflowConfig, run_dir: epath.Path, config: dict[str, Any]):
        mlflow = _require("mlflow", "mlflow")
        if cfg.tracking_uri:
            mlflow.set_tracking_uri(cfg.tracking_uri)
        resumed = _run_id(run_dir, "mlflow_run_id")
        if resumed is None:
            mlflow.set_experiment(cfg.experiment)
        self.run = mlflow.start_run(run_id=resumed, run_name=None if resumed else cfg.name)
        (run_dir / "mlflow_run_id").write_text(self.run.info.run_id)
        if resumed is None:  # MLflow params are write-once: logged with the run
            mlflow.log_params(_flatten(config))
        self._mlflow = mlflow

    def log(self, record: dict) -> None:
        self._mlflow.log_metrics(_numbers(record), step=int(record["step"]))

    def close(self, loss_png: Path) -> None:
        if loss_png.is_file():
            self._mlflow.log_artifact(str(loss_png))
        self._mlflow.end_run()


def make_trackers(cfg: TrainConfig, run_dir: epath.Path, local_dir: Path) -> list:
    """The trackers `track.*` enables (call on process 0 only, after `check_trackers`). Their run ids are
    kept in `run_dir` (a resume continues the same runs); W&B's own files go to `local_dir`, which is the
    run directory unless that is in a bucket (`MetricsWriter.local_dir`)."""
    config = to_dict(cfg)
    trackers = []
    if cfg.track.wandb.enabled and wandb_mode(cfg.track.wandb) != "disabled":
        trackers.append(WandbTracker(cfg.track.wandb, run_dir, config, local_dir))
    if cfg.track.mlflow.enabled:
        trackers.append(MlflowTracker(cfg.track.mlflow, run_dir, config))
    return trackers
