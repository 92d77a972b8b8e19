"""The built-in task's records: answers checked by an independent computation, the held-out split kept apart
by its own rule (CRC32 of the digits, computed here with binascii), each record a pure function of its key."""

import binascii
import collections

import pytest

from sft_sharded.data.synthetic import MAX_DIGITS, MIN_DIGITS, SyntheticSource


def _question_answer(record):
    user, assistant = record["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    return user["content"], assistant["content"]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_records_are_correct_and_split_by_crc(split):
    source = SyntheticSource("mixed", split, size=2_000, seed=3)
    ops, lengths = collections.Counter(), collections.Counter()
    for i in range(len(source)):
        record, where = source[i]
        assert where == f"<built-in {split}>:{i}"
        question, answer = _question_answer(record)
        op, digits = question.split(":")
        assert digits.isdigit() and MIN_DIGITS <= len(digits) <= MAX_DIGITS
        assert answer == (digits[::-1] if op == "rev" else "".join(sorted(digits)))
        assert (binascii.crc32(digits.encode()) % 10 == 0) == (split == "eval")
        ops[op] += 1
        lengths[len(digits)] += 1
    # Both operations and every length turn up in roughly equal shares (uniform draws: 1,000 and 333 expected).
    assert set(ops) == {"rev", "sort"} and min(ops.values()) > 850
    assert set(lengths) == set(range(MIN_DIGITS, MAX_DIGITS + 1)) and min(lengths.values()) > 250


def test_records_are_a_pure_function_of_seed_split_and_index():
    a, b = SyntheticSource("mixed", "train", 100, seed=0), SyntheticSource("mixed", "train", 100, seed=0)
    assert [b[i] for i in reversed(range(100))] == [a[i] for i in reversed(range(100))]  # random access
    other_seed = SyntheticSource("mixed", "train", 100, seed=1)
    assert sum(a[i][0] == other_seed[i][0] for i in range(100)) < 5
    assert len({_question_answer(a[i][0])[0] for i in range(100)}) > 95  # distinct records


@pytest.mark.parametrize("task, op", [("reverse", "rev"), ("sort", "sort")])
def test_one_operation_tasks(task, op):
    source = SyntheticSource(task, "train", 50)
    assert {_question_answer(source[i][0])[0].split(":")[0] for i in range(50)} == {op}


def test_unknown_task_is_refused_by_name():
    with pytest.raises(ValueError, match="data.task='copy'"):
        SyntheticSource("copy")
