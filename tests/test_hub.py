"""Hugging Face datasets on disk (data/hub.py): `save_to_disk` directories, Hub-style repositories and
`hf://datasets/NAME` from the local cache, read without the `datasets` library (which writes the fixtures
here, so the format is the real one)."""

import json

import pytest
from optional import optional
from test_errors import FAST, cli

from sft_sharded.config import load_config
from sft_sharded.data.pipeline import open_records
from sft_sharded.errors import UserError

datasets = optional("datasets")

CHATS = [{"messages": [{"role": "user", "content": f"sort {i} 1"}, {"role": "assistant", "content": f"1 {i}"}]}
         for i in range(6)]


def _records(path, split="train", **options):
    data = load_config(None, [f"data.path={json.dumps(path)}", f"data.eval_path={json.dumps(path)}",
                              *(f"data.{k}={v}" for k, v in options.items())]).data
    records = open_records(data, split, seed=0)
    return [records[i][0] for i in range(len(records))]


def test_save_to_disk_dataset_and_dataset_dict_read_as_their_records(tmp_path):
    whole = datasets.Dataset.from_list(CHATS)
    whole.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": whole.select(range(4)), "test": whole.select(range(4, 6))}).save_to_disk(
        str(tmp_path / "dict"))
    assert _records(str(tmp_path / "one")) == CHATS
    assert _records(str(tmp_path / "dict")) == CHATS[:4]
    assert _records(str(tmp_path / "dict"), split="eval") == CHATS[4:]  # data.eval_split (default "test")
    with pytest.raises(UserError, match=r"has splits \['train', 'test'\], not 'validation'"):
        _records(str(tmp_path / "dict"), split="eval", eval_split="validation")


def test_hub_style_repository_picks_the_split_files_in_order(tmp_path):
    repo = tmp_path / "repo"
    for name, rows in (("train-00000-of-00002", CHATS[:2]), ("train-00001-of-00002", CHATS[2:4]),
                       ("test-00000-of-00001", CHATS[4:])):
        datasets.Dataset.from_list(rows).to_parquet(str(repo / "data" / f"{name}.parquet"))
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    assert _records(str(repo)) == CHATS[:4]
    assert _records(str(repo), split="eval") == CHATS[4:]


def _cache(root, name, commit="0123abcd"):
    repo = root / ("datasets--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    datasets.Dataset.from_list(CHATS).to_parquet(str(repo / "snapshots" / commit / "data" / "train-00000-of-00001.parquet"))


def test_hf_url_resolves_from_the_local_cache_and_says_when_it_is_not_there(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _cache(tmp_path, "org/chats")
    assert _records("hf://datasets/org/chats") == CHATS
    assert _records("hf://datasets/org/chats@0123abcd") == CHATS
    with pytest.raises(UserError, match=r"'hf://datasets/org/other' is not in the local Hugging Face cache"):
        _records("hf://datasets/org/other")
    with pytest.raises(UserError, match=r"revision 'v2' of 'hf://datasets/org/chats@v2' is not in the local cache"):
        _records("hf://datasets/org/chats@v2")


def test_a_sharegpt_save_to_disk_dataset_and_a_hub_repository_train_through_the_cli(tmp_path, capsys):
    sharegpt = [{"conversations": [{"from": "human", "value": m["messages"][0]["content"]},
                                   {"from": "gpt", "value": m["messages"][1]["content"]}]} for m in CHATS * 4]
    datasets.Dataset.from_list(sharegpt).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(CHATS).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    run_dir = tmp_path / "run"
    status, err = cli(capsys, "train", *FAST, f"run_dir={run_dir}", f"data.path={tmp_path / 'saved'}",
                      f"data.eval_path={tmp_path / 'hub'}", "data.columns={conversations: messages, from: role, value: content}")
    assert status == 0, err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval_generated"] == 2 and any(r.get("num_tokens", 0) > 0 for r in records)
    assert [json.loads(line)["reference"] for line in (run_dir / "eval" / "step_2.jsonl").read_text().splitlines()] == [
        "1 0", "1 1"]
    # the Hub-style repository trains too: its train split for data.path, its test split for data.eval_path
    datasets.Dataset.from_list(CHATS * 4).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run2'}", f"data.path={tmp_path / 'hub'}",
                      f"data.eval_path={tmp_path / 'hub'}")
    assert status == 0, err
    records = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval_generated"] == 2 and sum(r.get("num_tokens", 0) for r in records) > 0
