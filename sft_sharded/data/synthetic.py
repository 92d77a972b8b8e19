"""The built-in SFT task as a regular `messages` source: reverse or sort a short digit string.

    user "rev:38172"  ->  assistant "27183"        user "sort:38172"  ->  assistant "12378"

Record i is a pure function of (seed, split, i), so the source has random access like a file. A digit
string belongs to the held-out split when its CRC32 is 0 mod 10; the train split never contains one, so
held-out accuracy measures generalisation, not recall.
"""

from __future__ import annotations

import zlib

import numpy as np

MIN_DIGITS, MAX_DIGITS = 3, 8
_OPS = {"reverse": ("rev", lambda s: s[::-1]), "sort": ("sort", lambda s: "".join(sorted(s)))}


def is_heldout(digits: str) -> bool:
    return zlib.crc32(digits.encode()) % 10 == 0


def make_pair(rng: np.random.Generator, task: str, heldout: bool) -> tuple[str, str]:
    while True:
        op = task if task != "mixed" else ("reverse", "sort")[rng.integers(2)]
        digits = "".join(map(str, rng.integers(0, 10, rng.integers(MIN_DIGITS, MAX_DIGITS + 1))))
        if is_heldout(digits) == heldout:
            name, fn = _OPS[op]
            return f"{name}:{digits}", fn(digits)


class SyntheticSource:
    """`size` chat records of the built-in task; `split` is "train" or "eval"."""

    def __init__(self, task: str = "mixed", split: str = "train", size: int = 100_000, seed: int = 0):
        if task not in ("mixed", *_OPS):
            raise ValueError(f"data.task={task!r} must be one of {['mixed', *_OPS]}")
        self.task, self.split, self.size, self.seed = task, split, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[dict, str]:
        rng = np.random.default_rng([self.seed, int(self.split == "eval"), index])
        question, answer = make_pair(rng, self.task, heldout=self.split == "eval")
        record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        return record, f"<built-in {self.split}>:{index}"
