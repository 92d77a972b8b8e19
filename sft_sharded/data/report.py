"""The data report: what the pipeline keeps, cuts and refuses (by cause, with the first places), how long
the examples are, how full packed rows are, and a warning when `data.max_length` cuts many records.

`train` prints it before compiling; `sft-sharded data` prints it with records rendered (data/view.py).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from sft_sharded.config import DataConfig
from sft_sharded.data import packing

EXAMPLES_PER_CAUSE = 3  # places named for each refusal cause (a template that raises refuses every record)
CUT_WARNING = 0.05  # share of records cut or dropped by max_length above which the report warns


@dataclasses.dataclass(frozen=True)
class DataReport:
    counts: collections.Counter  # kept, truncated, too_long, no_target, template, scanned, complete
    refusals: dict[str, tuple[int, list[str]]]  # cause -> (records, the first places)
    lengths: np.ndarray  # input positions of each example before data.max_length
    rows: int  # rows the kept examples fill (packed, or one each)
    positions: int  # non-padding positions in them
    max_length: int
    truncation: str

    def lines(self) -> list[str]:
        c = self.counts
        out = [f"data: {c['scanned']:,} records scanned{' (all)' if c['complete'] else ''}: {c['kept']:,} kept, "
               f"{c['truncated']:,} truncated, {c['too_long']:,} dropped as too long, {c['no_target']:,} dropped with "
               f"no trained token, {c['template']:,} refused by the chat template"]
        for cause, (n, places) in sorted(self.refusals.items(), key=lambda kv: -kv[1][0]):
            more = f", ... {n - len(places):,} more" if n > len(places) else ""
            out.append(f"  {n:,} refused: {cause} (e.g. {', '.join(places)}{more})")
        if self.lengths.size:
            out.append("  lengths (input positions): " + histogram(self.lengths))
        if self.rows:
            out.append(f"  {self.positions / self.rows:,.1f} tokens per row of {self.max_length} after packing "
                       f"({self.positions / (self.rows * self.max_length):.0%} full, {self.rows:,} rows)")
        cut = c["truncated"] + c["too_long"]
        if c["scanned"] and cut / c["scanned"] > CUT_WARNING:
            keep = int(np.percentile(self.lengths, 99, method="higher"))
            what = "cut at the end" if self.truncation == "truncate" else "dropped"
            out.append(f"warning: {cut:,} of {c['scanned']:,} records ({cut / c['scanned']:.0%}) are longer than "
                       f"data.max_length={self.max_length} and were {what}; data.max_length={keep} keeps 99% whole")
        return out


def histogram(lengths: np.ndarray) -> str:
    """Counts of lengths in power-of-two bins: '<=64: 12 | <=128: 40 | ...'."""
    top = max(int(lengths.max()), 1)
    edges = [2 ** k for k in range(4, top.bit_length() + 1)] or [16]
    if edges[-1] < top:
        edges.append(2 ** top.bit_length())
    counts = np.histogram(lengths, bins=[0, *edges])[0]
    return " | ".join(f"<={e:,}: {n:,}" for e, n in zip(edges, counts) if n)


def build(cfg: DataConfig, counts: collections.Counter, items: list) -> DataReport:
    """The report of `pipeline.scan`'s (place, Encoded) items."""
    refusals: dict[str, tuple[int, list[str]]] = {}
    for where, item in items:
        if item.detail:
            n, places = refusals.get(item.detail, (0, []))
            refusals[item.detail] = (n + 1, places + [where] if len(places) < EXAMPLES_PER_CAUSE else places)
    lengths = np.array([n for _, item in items for n in item.lengths], dtype=np.int64)
    kept = [n for _, item in items for n in item.positions]
    if cfg.packing:  # as the pipeline packs: best fit within each chunk of data.pack_buffer examples
        n_rows = sum(len(packing.best_fit_decreasing(kept[i : i + cfg.pack_buffer], cfg.max_length))
                     for i in range(0, len(kept), cfg.pack_buffer))
    else:
        n_rows = len(kept)
    return DataReport(counts, refusals, lengths, n_rows, sum(kept), cfg.max_length, cfg.truncation)
