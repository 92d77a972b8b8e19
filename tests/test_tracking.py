"""Trackers (tracking.py), offline: a local MLflow file store and W&B's offline mode. The values logged
are read back from each tracker's own storage and compared with metrics.jsonl; a resumed run continues
the same tracker runs; a missing package is one clear line."""

import json
import sys
from pathlib import Path

import pytest
from optional import optional
from test_errors import FAST, assert_one_line, cli

from sft_sharded.cli import main

wandb = optional("wandb")
mlflow = optional("mlflow")


def wandb_history(run_dir: Path) -> tuple[dict[int, dict], list[str], dict]:
    """{step: logged values}, the record kinds and the run's config of every offline W&B run file under
    run_dir, read from the file itself (LevelDB log blocks of protobuf records, after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    history, kinds, config = {}, [], {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            if left < 7 or (length == 0 and kind == 0):  # block trailer or zero padding
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                kinds.append(record.WhichOneof("record_type"))
                if kinds[-1] == "run":
                    config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
                if kinds[-1] == "history":
                    items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item}
                    step = items.pop("_step", None)
                    history[int(record.history.step.num if step is None else step)] = items
    return history, kinds, config


def test_wandb_and_mlflow_log_what_metrics_jsonl_has_and_resume_the_same_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's local file store, for this test
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B's own setting, honoured (track.wandb.mode is unset)
    run_dir = tmp_path / "run"
    track = ["track.wandb.enabled=true", "track.wandb.project=test",
             "track.mlflow.enabled=true", f"track.mlflow.tracking_uri=file://{tmp_path / 'mlruns'}"]
    for steps in (2, 3):  # the second run resumes from the step-2 checkpoint
        status, err = cli(capsys, "train", *FAST, f"run_dir={run_dir}", f"steps={steps}", "checkpoint.every=2",
                          "checkpoint.async_save=false", *track)
        assert status == 0, err
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert sorted(losses) == [1, 2, 3]

    client = mlflow.tracking.MlflowClient(f"file://{tmp_path / 'mlruns'}")
    run_id = (run_dir / "mlflow_run_id").read_text()
    runs = client.search_runs([client.get_experiment_by_name("sft_sharded").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # resumed, not a second run
    assert {m.step: m.value for m in client.get_metric_history(run_id, "loss")} == pytest.approx(losses)
    assert runs[0].data.params["optim.lr"] == "0.003"
    assert "loss.png" in [a.path for a in client.list_artifacts(run_id)]

    history, kinds, config = wandb_history(run_dir)
    assert len(set(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 2  # two sessions of one run id
    assert {p.name for p in run_dir.glob("wandb/offline-run-*/run-*.wandb")} == {
        f"run-{(run_dir / 'wandb_run_id').read_text()}.wandb"}
    assert {step: h["loss"] for step, h in history.items() if "loss" in h} == pytest.approx(losses)
    assert config["optim"]["lr"] == 0.003 and "artifact" in kinds  # the config, and loss.png


def test_a_tracker_whose_package_is_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does when it is not installed
    status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}", "track.wandb.enabled=true")
    assert_one_line(status, err, "track.wandb.enabled=true needs the wandb package: pip install 'sft_sharded[wandb]'")
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_wandb_mode_disabled_in_the_environment_turns_the_tracker_off(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["train", *FAST, "steps=1", f"run_dir={tmp_path / 'run'}", "track.wandb.enabled=true"]) == 0
    assert "W&B is off: WANDB_MODE=disabled (track.wandb.enabled=true)" in capsys.readouterr().out
    assert not (tmp_path / "run" / "wandb").exists() and not (tmp_path / "run" / "wandb_run_id").exists()
