"""The built-in SFT task: reverse or sort a short digit string; loss on the answer (and its EOS) only.

    prompt  "rev:38172="   answer "27183"      prompt "sort:38172="   answer "12378"

The held-out set is drawn first from its own seed; training examples with a held-out prompt are skipped,
so held-out accuracy measures generalisation, not recall.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from sft_sharded.config import DataConfig
from sft_sharded.data.tokenizers import ByteTokenizer

MIN_DIGITS, MAX_DIGITS = 3, 8
_OPS = {"reverse": ("rev", lambda s: s[::-1]), "sort": ("sort", lambda s: "".join(sorted(s)))}


def make_example(rng: np.random.Generator, task: str) -> tuple[str, str]:
    op = task if task != "mixed" else ("reverse", "sort")[rng.integers(2)]
    name, fn = _OPS[op]
    digits = "".join(map(str, rng.integers(0, 10, rng.integers(MIN_DIGITS, MAX_DIGITS + 1))))
    return f"{name}:{digits}=", fn(digits)


def encode_example(prompt: str, answer: str, tok: ByteTokenizer, max_length: int) -> dict[str, np.ndarray]:
    """One row: input_ids/labels shifted by one, loss_mask on the answer's targets and the EOS."""
    prompt_ids = [tok.bos_id, *tok.encode(prompt)]
    tokens = prompt_ids + tok.encode(answer) + [tok.eos_id]
    if len(tokens) - 1 > max_length:
        raise ValueError(f"data.max_length={max_length} is too short for {prompt + answer!r} ({len(tokens) - 1} tokens)")
    row = {key: np.zeros(max_length, np.int32) for key in ("input_ids", "labels", "loss_mask")}
    n = len(tokens) - 1
    row["input_ids"][:n] = tokens[:-1]
    row["labels"][:n] = tokens[1:]
    row["loss_mask"][len(prompt_ids) - 1 : n] = 1  # targets from the first answer token through EOS
    row["loss_mask"] = row["loss_mask"].astype(bool)
    return row


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def heldout(cfg: DataConfig, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng([seed, 1])
    return [make_example(rng, cfg.task) for _ in range(cfg.num_eval)]


def eval_batches(cfg: DataConfig, seed: int, tok: ByteTokenizer) -> list[dict[str, np.ndarray]]:
    """The held-out set in batches of `data.batch_size` rows (the last one padded with empty rows)."""
    rows = [encode_example(p, a, tok, cfg.max_length) for p, a in heldout(cfg, seed)]
    empty = {key: np.zeros_like(value) for key, value in rows[0].items()}
    rows += [empty] * (-len(rows) % cfg.batch_size)
    return [_stack(rows[i : i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]


def train_batches(cfg: DataConfig, seed: int, tok: ByteTokenizer) -> Iterator[dict[str, np.ndarray]]:
    """Endless global batches of `data.batch_size` rows, deterministic in `seed`."""
    excluded = {prompt for prompt, _ in heldout(cfg, seed)}
    rng = np.random.default_rng([seed, 0])
    while True:
        rows = []
        while len(rows) < cfg.batch_size:
            prompt, answer = make_example(rng, cfg.task)
            if prompt not in excluded:
                rows.append(encode_example(prompt, answer, tok, cfg.max_length))
        yield _stack(rows)
