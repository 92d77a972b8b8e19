"""load_config: defaults, YAML, KEY=VALUE overrides, and errors that name the key."""

import dataclasses

import pytest
import yaml

from sft_sharded.config import ModelConfig, TrainConfig, dump_config, load_config


def test_defaults_are_the_built_in_job():
    cfg = load_config()
    assert cfg == TrainConfig()
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, 2, 2) and cfg.simulate_devices == 8


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 50\noptim:\n  lr: 0.01\n  grad_accum_steps: 2\nmesh: {data: 1, fsdp: -1}\n")
    cfg = load_config(path, ["optim.lr=1e-3", "model.remat=full", "optim.clip_norm=null"])
    assert cfg.steps == 50 and cfg.optim.grad_accum_steps == 2 and cfg.mesh.fsdp == -1
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # "1e-3" is a string to PyYAML
    assert cfg.model.remat == "full" and cfg.optim.clip_norm is None


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["steps=7", "data.batch_size=16"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["batch_size"] == 16


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], r"unknown config key 'optim.lrr'; did you mean optim.lr"),
        (["step=3"], r"unknown config key 'step'; did you mean steps"),
        (["steps=many"], r"steps='many' must be of type int"),
        (["model.remat=sometimes"], r"model.remat='sometimes' must be one of"),
        (["optim.lr=-1"], r"optim.lr=-1.0 must be > 0"),
        (["steps"], r"must look like key=value"),
        (["optim=3"], r"optim must be a mapping"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: [1,\n")
    with pytest.raises(ValueError, match="bad.yaml: line 2, column 1: not valid YAML: expected the node content"):
        load_config(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="bad.yaml: the top level must be a mapping"):
        load_config(path)


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
        assert len(path.read_text().splitlines()) < 40


def test_every_model_option_is_a_decoder_config_field_of_the_same_name():
    """run.model_config hands the model.* keys to the model as they are: a new key must be a model field."""
    from sft_sharded.models import DecoderConfig

    options = {f.name for f in dataclasses.fields(ModelConfig)} - {"preset", "path"}
    assert options and options <= {f.name for f in dataclasses.fields(DecoderConfig)}
