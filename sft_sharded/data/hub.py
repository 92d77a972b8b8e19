"""Hugging Face datasets as they lie on disk, read without the `datasets` library: a `save_to_disk`
directory (Arrow files listed in its state.json; a DatasetDict has one folder per split), a Hub-style
dataset repository (Parquet/JSONL shards such as `data/train-00000-of-00003.parquet`), or
`hf://datasets/NAME[@REVISION]` resolved from the local Hugging Face cache (never downloaded here: TPU
VMs and CI have no route to the Hub, and a run must not depend on one)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from etils import epath

from sft_sharded.rundir import paths
from sft_sharded.errors import MissingFileError, UserError

HF_PREFIX = "hf://datasets/"
SUFFIXES = (".parquet", ".jsonl", ".json")


def cache_dir() -> Path:
    """huggingface_hub's cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def resolve_hf_url(url: str, key: str) -> Path:
    """The cached snapshot directory of `hf://datasets/NAME[@REVISION]` (a branch, tag or commit)."""
    name, _, revision = url[len(HF_PREFIX):].strip("/").partition("@")
    repo = cache_dir() / ("datasets--" + name.replace("/", "--"))
    fetch = f"fetch it first, e.g. `huggingface-cli download --repo-type dataset {name}`"
    if not name or not repo.is_dir():
        raise MissingFileError(f"{key}: {url!r} is not in the local Hugging Face cache ({repo}); {fetch}")
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise MissingFileError(f"{key}: revision {revision or 'main'!r} of {url!r} is not in the local cache "
                               f"({repo / 'snapshots'}); {fetch}")
    return snapshot


def _in_split(relative: Path, split: str) -> bool:
    """Whether a repository file belongs to `split`: a `split/` folder, or a name `split-*`, `split_*`,
    `split.*` (the Hub's conventions: data/train-00000-of-00002.parquet, test.jsonl, train/part-0.parquet)."""
    return split in relative.parts[:-1] or re.match(rf"{re.escape(split)}([-_.]|$)", relative.name) is not None


def _files_under(directory: epath.Path) -> list[epath.Path]:
    """Every file below `directory` but hidden ones (`.cache/`, `.gitattributes`), sorted."""
    found = []
    for child in directory.iterdir():  # not walk(): epath's walk drops the gs:// of a bucket's paths
        if not child.name.startswith("."):
            found += _files_under(child) if child.is_dir() else [child]
    return sorted(found, key=str)


def dataset_files(directory: Path | epath.Path, split: str, key: str) -> list[epath.Path]:
    """The files of `split` in a dataset directory (local or in a bucket), in order."""
    directory = paths.path(directory, key)
    if (directory / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: a folder per split
        splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise UserError(f"{key}: {directory} has splits {splits}, not {split!r} (set data.split / data.eval_split)")
        directory = directory / split
    if (directory / "state.json").is_file():  # Dataset.save_to_disk: Arrow stream files, in order
        state = json.loads((directory / "state.json").read_text())
        files = [directory / item["filename"] for item in state.get("_data_files", [])]
        missing = [str(f) for f in files if not f.is_file()]
        if not files or missing:
            raise MissingFileError(f"{key}: {directory}/state.json lists {missing or 'no'} data file(s) that are "
                                   "missing")
        return files
    found = [p for p in _files_under(directory) if p.suffix in SUFFIXES]
    chosen = [p for p in found if _in_split(p.relative_to(directory), split)]
    if not chosen:
        raise MissingFileError(f"{key}: no {split!r} files in {directory} (looked for {split}-*, {split}.* and "
                               f"{split}/ among {len(found)} Parquet/JSONL file(s); data.split picks the split)")
    return chosen
