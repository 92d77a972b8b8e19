"""Sources, per-process shards, exact resume, mixtures and errors that name file and line."""

import dataclasses
import json

import numpy as np
import pytest

from sft_sharded.config import ConfigError, DataConfig
from sft_sharded.data.packing import unpack
from sft_sharded.data.pipeline import SavedDataState, make_iterator, read_by_index, resume_iterator, scan
from sft_sharded.data.sources import JsonlSource, ParquetSource
from sft_sharded.data.tokenizers import ByteTokenizer
from sft_sharded.errors import UserError

TOK = ByteTokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def texts_of(batch):
    out = []
    for r in range(batch["input_ids"].shape[0]):
        for tokens, _ in unpack({k: v[r] for k, v in batch.items()}):
            out.append(TOK.decode(tokens[1:]))
    return out


@pytest.fixture
def numbered(tmp_path):
    return write_jsonl(tmp_path / "n.jsonl", [{"text": f"record {i}"} for i in range(40)])


def test_jsonl_source_indexes_lines_and_skips_blank_ones(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    src = JsonlSource(path)
    assert len(src) == 2 and src[1] == ({"text": "b"}, f"{path}:3")


def test_parquet_source_reads_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(10)], "completion": ["c"] * 10}), path, row_group_size=3)
    src = ParquetSource(path)
    assert len(src) == 10 and src[7][0] == {"prompt": "p7", "completion": "c"}


def test_records_read_by_index_keep_grain_s_order_so_saved_data_states_still_fit(numbered):
    """The same records in the same order as grain's own source dataset, shuffled and mixed alike (a data
    state saved when the pipeline used `MapDataset.source` resumes at the same record)."""
    import grain

    source = JsonlSource(str(numbered))
    ours, grains = read_by_index(source), grain.MapDataset.source(source)
    assert len(ours) == len(grains) == 40
    assert [ours[i] for i in range(40)] == [grains[i] for i in range(40)]
    assert ([ours.shuffle(seed=3)[i] for i in range(80)] == [grains.shuffle(seed=3)[i] for i in range(80)]
            != [grains[i % 40] for i in range(80)])
    mixed = grain.MapDataset.mix([ours, read_by_index(source)[:10]], [0.7, 0.3])
    expected = grain.MapDataset.mix([grains, grains[:10]], [0.7, 0.3])
    assert [mixed[i] for i in range(50)] == [expected[i] for i in range(50)]


def test_two_processes_get_disjoint_shards_that_cover_the_data(numbered):
    cfg = DataConfig(path=str(numbered), packing=False, batch_size=2, pack_buffer=4, max_length=32)
    seen = []
    for process in (0, 1):
        it = make_iterator(cfg, TOK, seed=3, process_index=process, process_count=2, num_epochs=1)
        seen.append([t for batch in it for t in texts_of(batch)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"record {i}" for i in range(40))


def test_resume_from_saved_state_yields_the_same_batches(numbered):
    cfg = DataConfig(path=str(numbered), batch_size=4, pack_buffer=8, max_length=32)
    it = make_iterator(cfg, TOK, seed=1)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the state must survive a JSON round trip
    expected = [next(it) for _ in range(6)]  # crosses chunk and epoch boundaries
    resumed = make_iterator(cfg, TOK, seed=1)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_resume_picks_the_saved_state_that_fits_this_process_count(numbered):
    def batches(it, n=3):
        return [texts_of(next(it)) for _ in range(n)]

    cfg = DataConfig(path=str(numbered), batch_size=4, pack_buffer=8, max_length=32, packing=False)
    it = make_iterator(cfg, TOK, seed=1)
    batches(it, 2)
    state = it.get_state()
    expected = batches(it)
    same = SavedDataState(own=state, first=state, saved_by=1, where="ckpt/5/data")
    resumed, note = resume_iterator(cfg, TOK, same, seed=1, step=5)
    assert note is None and batches(resumed) == expected
    # saved by 2 processes, resumed by 1: with shard_by="rows" any process's state is the global position
    rows = dataclasses.replace(cfg, shard_by="rows")
    it = make_iterator(rows, TOK, seed=1, process_index=0, process_count=2)
    batches(it, 2)
    other = SavedDataState(own=None, first=it.get_state(), saved_by=2, where="ckpt/5/data")
    expected = batches(make_iterator(rows, TOK, seed=1), 5)[2:]
    resumed, note = resume_iterator(rows, TOK, other, seed=1, step=5)
    assert note is None and batches(resumed) == expected
    # records sharded for 2 processes cannot be continued by 1: a new order, said so
    resumed, note = resume_iterator(cfg, TOK, other, seed=1, step=5)
    assert note == "ckpt/5/data holds the data state of 2 process(es), not 1; the data order restarts (seed 6)"
    assert batches(resumed) == batches(make_iterator(cfg, TOK, seed=6))


def test_a_position_saved_with_n_worker_processes_resumes_only_with_n(numbered):
    # grain's position holds one state per worker process: resumed with another number of workers it failed
    # on a missing key or index (0 <-> 1, 2 -> 1) or gave other batches (1 -> 2); now the saved count is named.
    cfg = DataConfig(path=str(numbered), batch_size=4, pack_buffer=8, max_length=32, packing=False)
    it = make_iterator(cfg, TOK, seed=1)
    next(it)
    saved = SavedDataState(own=it.get_state(), first=None, saved_by=1, where="ckpt/5/data")
    expected = texts_of(next(it))
    resumed, note = resume_iterator(cfg, TOK, saved, seed=1, step=5, saved_worker_count=0)
    assert note is None and texts_of(next(resumed)) == expected
    for saved_count, current in ((2, 0), (0, 1), (1, 2)):
        with pytest.raises(UserError) as err:
            resume_iterator(dataclasses.replace(cfg, worker_count=current), TOK, saved, seed=1, step=5,
                            saved_worker_count=saved_count)
        assert str(err.value) == (f"ckpt/5/data holds a data position saved with data.worker_count={saved_count}, "
                                  f"which resumes only with as many grain workers (this run: data.worker_count="
                                  f"{current}); resume with data.worker_count={saved_count}")
    # a position another number of processes saved is not used (the order restarts): nothing to refuse
    other = SavedDataState(own=None, first=saved.own, saved_by=2, where="ckpt/5/data")
    _, note = resume_iterator(cfg, TOK, other, seed=1, step=5, saved_worker_count=2)
    assert note.endswith("the data order restarts (seed 6)")


def test_epochs_reshuffle_and_seed_matters(numbered):
    cfg = DataConfig(path=str(numbered), packing=False, batch_size=40, pack_buffer=40, max_length=32)
    it = make_iterator(cfg, TOK, seed=0)
    first, second = texts_of(next(it)), texts_of(next(it))
    assert sorted(first) == sorted(second) and first != second
    assert texts_of(next(make_iterator(cfg, TOK, seed=1))) != first


def test_unpacked_rows_pad_to_a_multiple_of(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "abc"}, {"text": "abcdefghijk"}])
    cfg = DataConfig(path=str(path), packing=False, batch_size=2, pad_to_multiple_of=8, max_length=64)
    batch = next(make_iterator(cfg, TOK, seed=0))
    assert batch["input_ids"].shape == (2, 16)  # longest row 12 positions -> 16
    assert batch["segment_ids"].sum() == 4 + 12
    # processes reading different records must agree on the length: they pad to max_length
    cfg2 = dataclasses.replace(cfg, batch_size=2)
    shapes = {next(make_iterator(cfg2, TOK, seed=0, process_index=i, process_count=2))["input_ids"].shape
              for i in (0, 1)}
    assert shapes == {(1, 64)}


def test_mixture_weights_follow_the_ratio(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}] * 50)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}] * 50)
    cfg = DataConfig(path=[str(a), str(b)], weights=[3.0, 1.0], packing=False, batch_size=40, max_length=8)
    it = make_iterator(cfg, TOK, seed=0)
    texts = [t for _ in range(5) for t in texts_of(next(it))]
    assert 0.68 <= texts.count("a") / len(texts) <= 0.82  # 3:1 in expectation; shuffled after mixing


def test_counts_report_truncated_and_dropped(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "x" * 50}, {"prompt": "y" * 40, "completion": "z"},
                                              {"text": "ok"}])
    counts = scan(DataConfig(path=str(path), max_length=20), TOK, 0)[0]
    assert (counts["kept"], counts["truncated"], counts["no_target"], counts["complete"]) == (2, 1, 1, True)
    dropped = scan(DataConfig(path=str(path), max_length=20, truncation="drop"), TOK, 0)[0]
    assert (dropped["kept"], dropped["too_long"]) == (1, 2)


def test_check_records_bounds_what_is_checked_before_training(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n' * 3 + '{"text": oops}\n')
    counts = scan(DataConfig(path=str(path), check_records=3), TOK, 0)[0]
    assert (counts["scanned"], counts["kept"], counts["complete"]) == (3, 3, False)
    for n in (4, -1):  # the malformed line is among the checked records
        with pytest.raises(ValueError, match=r"d.jsonl:4: malformed JSON"):
            scan(DataConfig(path=str(path), check_records=n), TOK, 0)
    with pytest.raises(ValueError, match=r"d.jsonl:4: malformed JSON"):  # held-out data is always read whole
        scan(DataConfig(path="unused", eval_path=str(path), check_records=1), TOK, 0, split="eval", whole=True)
    with pytest.raises(ConfigError, match=r"data.check_records=0 must be >= 1, or -1 for all records"):
        DataConfig(check_records=0)


def test_bad_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        scan(DataConfig(path=str(bad)), TOK, 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: the file has no records"):
        make_iterator(DataConfig(path=str(empty)), TOK)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        make_iterator(DataConfig(path=str(tmp_path / "*.parquet")), TOK)
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"text": "a"}, {"question": "?"}])
    with pytest.raises(ValueError, match=r"u.jsonl:2: no known format"):
        scan(DataConfig(path=str(unknown)), TOK, 0)


def test_built_in_task_is_a_messages_source_with_a_disjoint_held_out_split():
    cfg = DataConfig(num_eval=64)
    eval_texts = {t for batch in make_iterator(cfg, TOK, split="eval") for t in texts_of(batch)}
    train_it = make_iterator(dataclasses.replace(cfg, batch_size=64), TOK)
    train_texts = {t for _ in range(10) for t in texts_of(next(train_it))}
    assert len(eval_texts) > 50 and len(train_texts) > 1000
    assert not eval_texts & train_texts


WORKER_SCRIPT = """
import json, sys
from sft_sharded.config import DataConfig
from sft_sharded.data.pipeline import make_iterator
from sft_sharded.data.tokenizers import ByteTokenizer

if __name__ == "__main__":  # grain workers re-import __main__; absl flags are left unparsed on purpose:
    out = []                # make_iterator must cope (the CLI and library callers never parse them)
    for workers in (0, 2):
        it = make_iterator(DataConfig(path=sys.argv[1], batch_size=4, pack_buffer=8, max_length=32,
                                      worker_count=workers), ByteTokenizer(), seed=0)
        out.append([next(it)["input_ids"].tolist() for _ in range(6)])
    print(json.dumps(out[0] == out[1]))
"""


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(numbered, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(numbered)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "true"
