"""The data report: refusals counted by cause with the first places, the length histogram, packed rows, and
the warning when data.max_length cuts more than 5% of the records (with the length that keeps 99%)."""

import json

import numpy as np
from template_corpus import write_tokenizer

from sft_sharded.config import DataConfig
from sft_sharded.data import report
from sft_sharded.data.pipeline import scan
from sft_sharded.data.tokenizers import ByteTokenizer, HFTokenizer


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_refusals_are_counted_by_cause_with_the_first_places(tmp_path):
    # Mistral-Nemo's template: a system prompt makes the turn unlocatable, a chat without one trains.
    tok = HFTokenizer(write_tokenizer(tmp_path / "tok", "mistralai-Mistral-Nemo-Instruct-2407"))
    sys_chat = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi?"},
                             {"role": "assistant", "content": "Hi."}]}
    plain = {"messages": sys_chat["messages"][1:]}
    path = _write(tmp_path / "d.jsonl", [sys_chat] * 5 + [plain] * 2)
    cfg = DataConfig(path=str(path), max_length=64)
    lines = report.build(cfg, *scan(cfg, tok, 0)).lines()
    assert lines[0].startswith("data: 7 records scanned (all): 2 kept,") and "5 refused by the chat template" in lines[0]
    cause = [line for line in lines if "refused: assistant turn not locatable" in line]
    assert len(cause) == 1, lines  # one line per cause, not one per record
    assert cause[0].startswith("  5 refused: assistant turn not locatable in the chat template of ")
    assert f"(e.g. {path}:1, {path}:2, {path}:3, ... 2 more)" in cause[0]


def test_cut_warning_names_the_length_that_keeps_99_percent(tmp_path):
    records = [{"prompt": "q", "completion": "a" * n} for n in [5] * 90 + [40] * 10]
    cfg = DataConfig(path=str(_write(tmp_path / "d.jsonl", records)), max_length=16)
    counts, items = scan(cfg, ByteTokenizer(), 0)
    lines = report.build(cfg, counts, items).lines()
    # bos, q, the completion and eos: n + 3 tokens, n + 2 input positions
    want = int(np.percentile([n + 2 for n in [5] * 90 + [40] * 10], 99, method="higher"))
    assert lines[-1] == (f"warning: 10 of 100 records (10%) are longer than data.max_length=16 and were cut at "
                         f"the end; data.max_length={want} keeps 99% whole")
    assert "  lengths (input positions): <=16: 90 | <=64: 10" in lines
    few = DataConfig(path=str(_write(tmp_path / "e.jsonl", records[:90] + records[-4:])), max_length=16)
    assert not any(line.startswith("warning") for line in report.build(few, *scan(few, ByteTokenizer(), 0)).lines())


def test_packed_rows_report_tokens_per_row(tmp_path):
    records = [{"prompt": "q", "completion": "a" * 6}] * 8  # bos, q, 6 a, eos: 8 positions each: 2 per row of 16
    cfg = DataConfig(path=str(_write(tmp_path / "d.jsonl", records)), max_length=16)
    lines = report.build(cfg, *scan(cfg, ByteTokenizer(), 0)).lines()
    assert "  16.0 tokens per row of 16 after packing (100% full, 4 rows)" in lines
