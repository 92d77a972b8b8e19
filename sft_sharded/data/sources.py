"""Random-access record sources: JSONL (line-offset index, nothing else held in memory) and Parquet
(one row group in memory at a time). Each item is `(record, where)` with `where` = "file:line"."""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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


def expand_paths(path: str | Sequence[str]) -> list[Path]:
    """A file, a glob or a list of them -> existing files, in order."""
    items = [path] if isinstance(path, str) else list(path)
    files: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise MissingFileError(f"data.path: {item!r} matches no file")
        for match in matches:
            if not Path(match).is_file():
                raise MissingFileError(f"data.path: {match!r} is not a file")
            files.append(Path(match))
    return files


def open_source(path: Path):
    if path.suffix == ".parquet":
        return ParquetSource(path)
    if path.suffix in (".jsonl", ".json"):
        return JsonlSource(path)
    raise UserError(f"data.path: {path} is neither .jsonl nor .parquet")
