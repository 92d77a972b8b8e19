"""Random-access record sources: JSONL (line-offset index, nothing else held in memory), Parquet (one row
group in memory at a time) and Arrow (`datasets.save_to_disk` files, memory-mapped: pages are read as
records are). Each item is `(record, where)` with `where` = "file:line" or "file:row N".

Files in a bucket (`gs://`, ...) are read through `paths`: a JSONL file is indexed by one streaming pass
and each record is then one ranged read, a Parquet file reads one row group per request; an Arrow stream
file has no index to seek by, so a remote one is read whole (`save_to_disk` shards are at most 500 MB).
Open files are not pickled: a grain worker that receives a source opens its own."""

from __future__ import annotations

import array
import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from sft_sharded.rundir import paths
from sft_sharded.data import hub
from sft_sharded.errors import MissingFileError, UserError


class _Lazy:
    """A source whose open file (or table) is made on first use in each process: never pickled, and a
    forked worker opens its own (a shared file offset would mix two processes' reads)."""

    _handle = None
    _pid = None

    def _opened(self, make):
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = make(), os.getpid()
        return self._handle

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}


class JsonlSource(_Lazy):
    """The index is 8 bytes per record (its offset), and 8 more per record only in a file with blank lines
    (the line numbers errors name are then no longer the record numbers)."""

    def __init__(self, path: str | epath.Path):
        self.path = paths.path(path)
        offsets, lines, blank = array.array("q"), array.array("q"), False
        with self.path.open("rb") as f:
            pos = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    if blank:
                        lines.append(number)
                elif not blank:
                    blank, lines = True, array.array("q", range(1, len(offsets) + 1))
                pos += len(line)
        if not offsets:
            raise UserError(f"{self.path}: the file has no records")
        self._offsets = np.frombuffer(offsets, np.int64)
        self._lines = np.frombuffer(lines, np.int64) if blank else None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> tuple[object, str]:
        where = f"{self.path}:{int(self._lines[index]) if self._lines is not None else index + 1}"
        f = self._opened(lambda: self.path.open("rb"))
        f.seek(int(self._offsets[index]))
        raw = f.readline()
        try:
            return json.loads(raw), where
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None
        except UnicodeDecodeError as err:
            raise UserError(f"{where}: not UTF-8 text: byte {err.start + 1} of the line is "
                            f"{raw[err.start:err.start + 1]!r} ({err.reason})") from None


class ParquetSource(_Lazy):
    def __init__(self, path: str | epath.Path):
        self.path = paths.path(path)
        meta = self._file().metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._starts = np.cumsum([0, *sizes])
        if self._starts[-1] == 0:
            raise UserError(f"{self.path}: the file has no records")
        self._cached: tuple[int, list] | None = None

    def _file(self):
        return self._opened(self._read_footer)

    def _read_footer(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path.open("rb") if paths.is_remote(self.path) else str(self.path))
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a file it cannot read
            raise UserError(f"{self.path}: not a readable Parquet file ({type(err).__name__}: {err})") from None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[object, str]:
        group = int(np.searchsorted(self._starts, index, side="right") - 1)
        if self._cached is None or self._cached[0] != group:
            self._cached = (group, self._file().read_row_group(group).to_pylist())
        return self._cached[1][index - int(self._starts[group])], f"{self.path}:row {index}"


class ArrowSource(_Lazy):
    """An Arrow stream file as `datasets.save_to_disk` writes it, memory-mapped when local."""

    def __init__(self, path: str | epath.Path):
        self.path = paths.path(path)
        if len(self) == 0:
            raise UserError(f"{self.path}: the file has no records")

    def _open(self):
        return self._opened(self._read_table)

    def _read_table(self):
        import pyarrow as pa

        try:
            with (self.path.open("rb") if paths.is_remote(self.path) else pa.memory_map(str(self.path))) as f:
                return pa.ipc.open_stream(f).read_all()
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a file it cannot read
            raise UserError(f"{self.path}: not a readable Arrow stream ({type(err).__name__}: {err})") from None

    def __len__(self) -> int:
        return self._open().num_rows

    def __getitem__(self, index: int) -> tuple[object, str]:
        return self._open().slice(index, 1).to_pylist()[0], f"{self.path}:row {index}"


def expand_paths(path: str | Sequence[str], split: str = "train", key: str = "data.path") -> list[epath.Path]:
    """Files, globs, dataset directories (`datasets.save_to_disk`, Hub-style repositories: the files of
    `split`) and `hf://datasets/NAME` (the local Hugging Face cache), or a list of them -> existing files,
    in order."""
    items = [path] if isinstance(path, str) else list(path)
    files: list[epath.Path] = []
    for item in items:
        if item.startswith(hub.HF_PREFIX):
            files += hub.dataset_files(hub.resolve_hf_url(item, key), split, key)
            continue
        matches = paths.glob(item, key) if paths.has_wildcard(item) else [paths.path(item, key)]
        if not matches:
            raise MissingFileError(f"{key}: {item!r} matches no file")
        for match in matches:
            if match.is_dir():
                files += hub.dataset_files(match, split, key)
            elif not match.is_file():
                raise MissingFileError(f"{key}: {str(match)!r} is not a file")
            else:
                files.append(match)
    return files


def open_source(path: epath.Path, key: str = "data.path"):
    if path.suffix == ".parquet":
        return ParquetSource(path)
    if path.suffix in (".jsonl", ".json"):
        return JsonlSource(path)
    if path.suffix == ".arrow":
        return ArrowSource(path)
    raise UserError(f"{key}: {path} is neither .jsonl, .parquet nor .arrow")
