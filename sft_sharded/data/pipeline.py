"""The grain pipeline: source -> shuffle (per epoch) -> this process's shard -> tokenize + template ->
truncate/filter -> pack (best fit within a buffer) -> batches of this process's rows, with resumable state.

Packing works on chunks of `data.pack_buffer` consecutive examples; chunk c is a pure function of c, so
the iterator state is (grain state before the current chunk, rows already taken from it).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import grain
import numpy as np

from sft_sharded.config import DataConfig
from sft_sharded.data import packing
from sft_sharded.data.formats import (RowSkipped, detect_format, encode_record, encode_turns, fit_length,
                                     rename_columns)
from sft_sharded.data.sources import expand_paths, open_source
from sft_sharded.data.synthetic import SyntheticSource
from sft_sharded.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SavedDataState:
    """The data-iterator states of a checkpoint: this process's own (None when another number of
    processes saved it), process 0's, and how many processes saved it."""

    own: dict | None
    first: dict | None
    saved_by: int
    where: str  # the checkpoint's data directory, for messages


class ConcatSource:
    def __init__(self, sources):
        self.sources = list(sources)
        self._starts = np.cumsum([0, *map(len, self.sources)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int):
        s = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self.sources[s][index - int(self._starts[s])]


@dataclasses.dataclass(frozen=True)
class ReadRecord:
    """Index -> the source's record (a class, not a lambda: grain workers pickle it)."""

    source: Any

    def __call__(self, index: int):
        return self.source[index]


def read_by_index(source) -> grain.MapDataset:
    """`source` as a grain dataset of the same records in the same order. Not `MapDataset.source`: for each
    record that one also walks the record's tree to estimate its bytes for grain's read metrics, which
    cost about a seventh of the built-in task's CPU time per record (the record's encoding included)."""
    return grain.MapDataset.range(len(source)).map(ReadRecord(source))


def open_records(cfg: DataConfig, split: str, seed: int) -> grain.MapDataset:
    """Records as (record, where): the files of `data.path` (or `data.eval_path`), else the built-in task."""
    path = cfg.path if split == "train" else cfg.eval_path
    if path is None:
        if split == "eval" and cfg.path is not None:
            raise UserError("data.eval_path is required for held-out evaluation of data.path files")
        size = 1_000_000 if split == "train" else cfg.num_eval
        return read_by_index(SyntheticSource(cfg.task, split, size, seed))
    key, data_split = ("data.path", cfg.split) if split == "train" else ("data.eval_path", cfg.eval_split)
    sources = [open_source(p, key) for p in expand_paths(path, data_split, key)]
    if cfg.weights is None or split == "eval":
        records = read_by_index(ConcatSource(sources))
    elif len(cfg.weights) != len(sources):
        raise UserError(f"data.weights has {len(cfg.weights)} entries for {len(sources)} files")
    else:
        records = grain.MapDataset.mix([read_by_index(s) for s in sources], cfg.weights)
    return records.map(RenameColumns(cfg.columns)) if cfg.columns else records


@dataclasses.dataclass(frozen=True)
class RenameColumns:
    """(record, where) with `data.columns` applied (a class, not a lambda: grain workers pickle it)."""

    columns: dict

    def __call__(self, item):
        return rename_columns(item[0], self.columns), item[1]


@dataclasses.dataclass
class Encoded:
    examples: tuple  # the record's Examples (several with multi_turn_reasoning=per_turn); () when skipped
    reason: str = ""  # why it was skipped: too_long, no_target, template
    truncated: bool = False
    detail: str = ""  # the template's refusal, without the record's place (for counting by cause)
    lengths: tuple = ()  # each example's input positions before max_length applied
    positions: tuple = ()  # each kept example's input positions (after max_length)


class Encode:
    """record -> Encoded; malformed records raise (naming file and line), unusable ones are counted."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def __call__(self, item) -> Encoded:
        record, where = item
        cfg = self.cfg
        try:
            if cfg.multi_turn_reasoning == "per_turn" and not cfg.train_on_prompt and cfg.format in (
                    "auto", "messages") and detect_format(record, where) == "messages":
                examples = encode_turns(record, self.tokenizer, where=where)
            else:
                examples = [encode_record(record, self.tokenizer, fmt=cfg.format,
                                          train_on_prompt=cfg.train_on_prompt, where=where)]
        except RowSkipped as err:
            # Counted by cause in the data report (`sft-sharded data`), not one warning per record.
            log.debug("skipping %s", err)
            return Encoded((), "template", detail=err.reason)
        lengths = tuple(len(e.tokens) - 1 for e in examples)
        kept, reason = [], "no_target"
        for example in examples:
            fitted = fit_length(example, cfg.max_length, cfg.truncation)
            if fitted is not None:
                kept.append(fitted)
            elif len(example.tokens) - 1 > cfg.max_length and cfg.truncation == "drop":
                reason = "too_long"
        if not kept:
            return Encoded((), reason, lengths=lengths)
        return Encoded(tuple(kept), truncated=any(e.truncated for e in kept), lengths=lengths,
                       positions=tuple(len(e.tokens) - 1 for e in kept))


class PackChunk:
    """Chunk index -> (rows, counts) for `pack_buffer` consecutive encoded examples."""

    def __init__(self, encoded: grain.MapDataset, cfg: DataConfig):
        self.encoded, self.cfg = encoded, cfg

    def __call__(self, chunk: int):
        start = chunk * self.cfg.pack_buffer
        items = [self.encoded[i] for i in range(start, min(start + self.cfg.pack_buffer, len(self.encoded)))]
        counts = collections.Counter(item.reason or "kept" for item in items)
        counts["truncated"] = sum(item.truncated for item in items)
        examples = [example for item in items for example in item.examples]
        if self.cfg.packing:
            rows = packing.pack(examples, self.cfg.max_length)
        else:
            rows = [packing.pad(e, len(e.tokens) - 1) for e in examples]
        return rows, dict(counts)


class BatchIterator:
    """Batches of `rows` rows from a grain iterator of chunks; `get_state`/`set_state` resume exactly."""

    def __init__(self, chunks: grain.IterDataset, rows: int, cfg: DataConfig, pad_last: bool = False,
                 keep: slice = slice(None), same_rows_everywhere: bool = True):
        self._chunks = iter(chunks)
        self._rows, self._cfg, self._pad_last, self._keep = rows, cfg, pad_last, keep
        # Unpacked rows are padded to the batch's longest only when every process sees the same rows;
        # otherwise processes could disagree on the length, so they all pad to max_length.
        self._dynamic_length = not cfg.packing and same_rows_everywhere
        self._chunk_state = self._chunks.get_state()  # state before the chunk in `_pending`
        self._pending: list = []
        self._taken = 0  # rows of the current chunk already yielded
        self.counts: collections.Counter = collections.Counter()
        self.efficiency_sum, self.batches = 0.0, 0

    def __iter__(self):
        return self

    def _next_row(self):
        while self._taken >= len(self._pending):
            self._chunk_state = self._chunks.get_state()
            self._pending, counts = next(self._chunks)
            self._taken = 0
            self.counts.update(counts)
        self._taken += 1
        return self._pending[self._taken - 1]

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        try:
            while len(rows) < self._rows:
                rows.append(self._next_row())
        except StopIteration:
            if not rows or not self._pad_last:
                raise
            empty = {key: np.zeros(1, rows[0][key].dtype) for key in packing.ROW_KEYS}
            rows += [empty] * (self._rows - len(rows))  # segment 0, nothing trained
        length = self._cfg.max_length
        if self._dynamic_length:  # pad to the longest row, rounded up to pad_to_multiple_of
            multiple = self._cfg.pad_to_multiple_of
            length = min(-(-max(r["input_ids"].size for r in rows) // multiple) * multiple, self._cfg.max_length)
        rows = rows[self._keep]  # shard_by="rows": this process's rows of the global batch
        batch = {key: np.zeros((len(rows), length), rows[0][key].dtype) for key in packing.ROW_KEYS}
        for i, row in enumerate(rows):
            for key in packing.ROW_KEYS:
                batch[key][i, : row[key].size] = row[key]
        self.efficiency_sum += packing.efficiency([batch])
        self.batches += 1
        return batch

    @property
    def efficiency(self) -> float:
        """Mean packing efficiency (real positions / all positions) of the batches yielded so far."""
        return self.efficiency_sum / max(self.batches, 1)

    def get_state(self) -> dict:
        return {"chunks": self._chunk_state, "taken": self._taken}

    def set_state(self, state: dict) -> None:
        self._chunks.set_state(state["chunks"])
        self._chunk_state, self._pending, self._taken = state["chunks"], [], 0
        for _ in range(state["taken"]):
            self._next_row()


def make_iterator(cfg: DataConfig, tokenizer, *, split: str = "train", seed: int = 0,
                  process_index: int = 0, process_count: int = 1, num_epochs: int | None = None) -> BatchIterator:
    """This process's batches of `data.batch_size // process_count` rows (see `DataConfig.shard_by`)."""
    if cfg.batch_size % process_count:
        raise UserError(f"data.batch_size={cfg.batch_size} is not divisible by {process_count} processes")
    records = open_records(cfg, split, seed)
    if split == "train":
        records = records.shuffle(seed=seed)
    records = records.repeat(num_epochs if split == "train" else 1)
    per_process = cfg.batch_size // process_count
    if cfg.shard_by == "records":
        records, rows, keep = records[process_index::process_count], per_process, slice(None)
    else:
        rows, keep = cfg.batch_size, slice(process_index * per_process, (process_index + 1) * per_process)
    encoded = records.map(Encode(cfg, tokenizer))
    num_chunks = -(-len(encoded) // cfg.pack_buffer)
    # One chunk holds many batches: a short read-ahead keeps the trainer fed without grain's default of
    # 500 chunks prefetched on 16 threads (which tokenizes 100k+ records at start-up, stealing the CPU).
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    chunks = grain.MapDataset.range(num_chunks).map(PackChunk(encoded, cfg)).to_iter_dataset(read)
    if cfg.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; a library caller has none
            flags.FLAGS.mark_as_parsed()
        chunks = chunks.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return BatchIterator(chunks, rows, cfg, pad_last=split == "eval", keep=keep,
                         same_rows_everywhere=process_count == 1 or cfg.shard_by == "rows")


def resume_iterator(cfg: DataConfig, tokenizer, saved: SavedDataState, *, seed: int, step: int,
                    process_index: int = 0, process_count: int = 1, saved_worker_count: int | None = None
                    ) -> tuple[BatchIterator, str | None]:
    """This process's iterator positioned where a checkpoint left the data, and a note when it cannot be.

    Saved by as many processes: each takes its own state. With `shard_by="rows"` every process builds the
    same global stream, so any saved state fits any process count. Otherwise the records were sharded
    for another process count: the order restarts with a new shuffle seed (`seed + step`) rather than
    replaying the first batches (model and optimizer state are exact either way).

    grain's saved position holds one iterator state per worker process (`data.worker_count`; the main
    process's own form for 0), so it resumes exactly only with as many: with another number grain fails on
    a missing key or index, or silently continues elsewhere in the data. A position saved with another
    number (`saved_worker_count`, from the checkpoint's config; None when unknown) is refused by name when
    it would be used."""
    shard = dict(process_index=process_index, process_count=process_count)
    state = saved.own if saved.own is not None else saved.first if cfg.shard_by == "rows" else None
    if state is None:
        note = (f"{saved.where} holds the data state of {saved.saved_by} process(es), not {process_count}; the "
                f"data order restarts (seed {seed + step})")
        return make_iterator(cfg, tokenizer, seed=seed + step, **shard), note
    if saved_worker_count is not None and saved_worker_count != cfg.worker_count:
        raise UserError(f"{saved.where} holds a data position saved with data.worker_count={saved_worker_count}, "
                        f"which resumes only with as many grain workers (this run: data.worker_count="
                        f"{cfg.worker_count}); resume with data.worker_count={saved_worker_count}")
    batches = make_iterator(cfg, tokenizer, seed=seed, **shard)
    batches.set_state(state)
    return batches, None


def scan(cfg: DataConfig, tokenizer, seed: int, keep: int = 0, split: str = "train", whole: bool = False
         ) -> tuple[collections.Counter, list[tuple[str, Encoded]]]:
    """Kept, truncated and dropped counts over the first `data.check_records` records of `split` (all of them
    when `whole`, when it is -1 or when the dataset is smaller), and each scanned record's place and Encoded,
    for the data report (`data.report`). Malformed records raise here, before compiling. The examples' arrays
    are kept for the first `keep` records only (a dataset of long records would not fit in memory)."""
    records = open_records(cfg, split, seed)
    encode = Encode(cfg, tokenizer)
    limit = -1 if whole else cfg.check_records
    scanned = len(records) if limit == -1 else min(len(records), limit)
    counts = collections.Counter({"kept": 0, "truncated": 0, "too_long": 0, "no_target": 0, "template": 0})
    items, alike = [], {}
    for i in range(scanned):
        record = records[i]
        item = encode(record)
        counts[item.reason or "kept"] += 1
        counts["truncated"] += item.truncated
        if i < keep:
            items.append((record[1], item))
        elif item.detail:  # a refused record: the report names its place
            items.append((record[1], dataclasses.replace(item, examples=())))
        else:  # the report needs only the lengths; records alike share one entry (8 bytes per record)
            key = (item.reason, item.truncated, item.lengths, item.positions)
            items.append(alike.get(key) or alike.setdefault(key, ("", dataclasses.replace(item, examples=()))))
    counts["scanned"], counts["complete"] = scanned, scanned == len(records)
    return counts, items
