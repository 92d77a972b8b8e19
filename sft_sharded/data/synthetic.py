"""The built-in SFT task as a regular `messages` source: reverse or sort a short digit string.

    user "rev:38172"  ->  assistant "27183"        user "sort:38172"  ->  assistant "12378"

Record i is a pure function of (seed, split, i), so the source has random access like a file. A digit
string belongs to the held-out split when its CRC32 is 0 mod 10; the train split never contains one, so
held-out accuracy measures generalisation, not recall.
"""

from __future__ import annotations

import hashlib
import zlib

MIN_DIGITS, MAX_DIGITS = 3, 8
_LENGTHS = MAX_DIGITS - MIN_DIGITS + 1  # how many digit-string lengths a record can have
_OPS = {"reverse": ("rev", lambda s: s[::-1]), "sort": ("sort", lambda s: "".join(sorted(s)))}


def is_heldout(digits: str) -> bool:
    return zlib.crc32(digits.encode()) % 10 == 0


def make_pair(key: str, task: str, heldout: bool) -> tuple[str, str]:
    """The question and answer drawn from `key`'s hash: 128 bits give the operation, the length and the
    digits, each uniform to within 2**-90. A hash, not numpy's seeded generator: the generator's seeding
    was a seventh of the whole pipeline's CPU time per record, and the records train on two cores shared
    with the step."""
    for attempt in range(1_000):  # a held-out draw succeeds one time in ten
        n = int.from_bytes(hashlib.blake2b(f"{key}/{attempt}".encode(), digest_size=16).digest(), "little")
        op = task if task != "mixed" else ("reverse", "sort")[n & 1]
        n >>= 1
        length = MIN_DIGITS + n % _LENGTHS
        digits = f"{n // _LENGTHS % 10**length:0{length}d}"
        if is_heldout(digits) == heldout:
            name, fn = _OPS[op]
            return f"{name}:{digits}", fn(digits)
    raise RuntimeError(f"no {'held-out' if heldout else 'train'} digit string drawn for {key}")


class SyntheticSource:
    """`size` chat records of the built-in task; `split` is "train" or "eval"."""

    def __init__(self, task: str = "mixed", split: str = "train", size: int = 100_000, seed: int = 0):
        if task not in ("mixed", *_OPS):
            raise ValueError(f"data.task={task!r} must be one of {['mixed', *_OPS]}")
        self.task, self.split, self.size, self.seed = task, split, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[dict, str]:
        question, answer = make_pair(f"{self.seed}/{self.split}/{index}", self.task, heldout=self.split == "eval")
        record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        return record, f"<built-in {self.split}>:{index}"
