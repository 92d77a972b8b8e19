"""Random-access record sources: JSONL (line-offset index, nothing else held in memory), Parquet (one row
group in memory at a time) and Arrow (`datasets.save_to_disk` files, memory-mapped: pages are read as
records are). Each item is `(record, where)` with `where` = "file:line" or "file:row N"."""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sft_sharded.data import hub
from sft_sharded.errors import MissingFileError, UserError


class JsonlSource:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        offsets, lines = [], []
        with self.path.open("rb") as f:
            pos = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(number)
                pos += len(line)
        if not offsets:
            raise UserError(f"{self.path}: the file has no records")
        self._offsets = np.asarray(offsets, np.int64)
        self._lines = np.asarray(lines, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> tuple[object, str]:
        where = f"{self.path}:{int(self._lines[index])}"
        with self.path.open("rb") as f:
            f.seek(int(self._offsets[index]))
            raw = f.readline()
        try:
            return json.loads(raw), where
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None


class ParquetSource:
    def __init__(self, path: str | Path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a file it cannot read
            raise UserError(f"{self.path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._starts = np.cumsum([0, *sizes])
        if self._starts[-1] == 0:
            raise UserError(f"{self.path}: the file has no records")
        self._cached: tuple[int, list] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[object, str]:
        group = int(np.searchsorted(self._starts, index, side="right") - 1)
        if self._cached is None or self._cached[0] != group:
            self._cached = (group, self._file.read_row_group(group).to_pylist())
        return self._cached[1][index - int(self._starts[group])], f"{self.path}:row {index}"


class ArrowSource:
    """An Arrow stream file as `datasets.save_to_disk` writes it, memory-mapped (opened lazily, so a
    grain worker that receives this object by pickle maps the file itself)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._table = None
        if len(self) == 0:
            raise UserError(f"{self.path}: the file has no records")

    def _open(self):
        if self._table is None:
            import pyarrow as pa

            try:
                self._table = pa.ipc.open_stream(pa.memory_map(str(self.path))).read_all()
            except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a file it cannot read
                raise UserError(f"{self.path}: not a readable Arrow stream ({type(err).__name__}: {err})") from None
        return self._table

    def __getstate__(self):
        return {"path": self.path, "_table": None}

    def __len__(self) -> int:
        return self._open().num_rows

    def __getitem__(self, index: int) -> tuple[object, str]:
        return self._open().slice(index, 1).to_pylist()[0], f"{self.path}:row {index}"


def expand_paths(path: str | Sequence[str], split: str = "train", key: str = "data.path") -> list[Path]:
    """Files, globs, dataset directories (`datasets.save_to_disk`, Hub-style repositories: the files of
    `split`) and `hf://datasets/NAME` (the local Hugging Face cache), or a list of them -> existing files,
    in order."""
    items = [path] if isinstance(path, str) else list(path)
    files: list[Path] = []
    for item in items:
        if item.startswith(hub.HF_PREFIX):
            files += hub.dataset_files(hub.resolve_hf_url(item, key), split, key)
            continue
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise MissingFileError(f"{key}: {item!r} matches no file")
        for match in matches:
            if Path(match).is_dir():
                files += hub.dataset_files(Path(match), split, key)
            elif not Path(match).is_file():
                raise MissingFileError(f"{key}: {match!r} is not a file")
            else:
                files.append(Path(match))
    return files


def open_source(path: Path, key: str = "data.path"):
    if path.suffix == ".parquet":
        return ParquetSource(path)
    if path.suffix in (".jsonl", ".json"):
        return JsonlSource(path)
    if path.suffix == ".arrow":
        return ArrowSource(path)
    raise UserError(f"{key}: {path} is neither .jsonl, .parquet nor .arrow")
