"""What `quiet_failed_saves` and `quiet_failed_reads` drop (the logged and unraisable echoes of a failed
asynchronous save or restore) and what they let through; the whole paths, a real disk filling under orbax's
writers and a truncated checkpoint resumed, are in test_faults.py and test_errors.py."""

import errno
import gc
import logging
import sys
import warnings

from sft_sharded.rundir.write_echoes import quiet_failed_reads, quiet_failed_saves


class Unraisable:
    def __init__(self, exc):
        self.exc_value = exc


def test_only_the_echoes_of_a_failed_save_are_dropped(caplog):
    before = sys.unraisablehook
    seen = []
    sys.unraisablehook = seen.append
    try:
        with caplog.at_level(logging.INFO), quiet_failed_saves() as echoes:
            logging.getLogger("absl").error("writing 'ckpt/2.orbax-checkpoint-tmp/state' failed: no space left")
            logging.getLogger("asyncio").error("Task exception was never retrieved",
                                               exc_info=ValueError("Error writing x in ckpt/2.orbax-checkpoint-tmp"))
            logging.getLogger("absl").error("an unrelated error")
            # A failed write (not open) names no file: its OSError alone says the disk is full.
            logging.getLogger("absl").error("_SignalingThread.run() raised an exception",
                                            exc_info=OSError(errno.ENOSPC, "No space left on device"))
            logging.getLogger("absl").error("_SignalingThread.run() raised an exception",
                                            exc_info=OSError(errno.EACCES, "Permission denied"))
            logging.getLogger("absl").info("saving to ckpt/2.orbax-checkpoint-tmp")  # not an error: kept
            sys.unraisablehook(Unraisable(RuntimeError("Event loop is closed")))
            sys.unraisablehook(Unraisable(RuntimeError("something else")))
        assert echoes.dropped == 4
        assert [r.getMessage() for r in caplog.records] == [
            "an unrelated error", "_SignalingThread.run() raised an exception", "saving to ckpt/2.orbax-checkpoint-tmp"]
        assert [str(u.exc_value) for u in seen] == ["something else"]
    finally:
        sys.unraisablehook = before  # the filters that stay after a failed save are removed by conftest.py


def test_a_run_without_a_failed_save_leaves_the_hooks_as_they_were():
    before = sys.unraisablehook
    filters = {name: list(logging.getLogger(name).filters) for name in ("absl", "asyncio")}
    with quiet_failed_saves() as echoes:
        assert sys.unraisablehook is not before
    assert echoes.dropped == 0 and sys.unraisablehook is before
    assert {name: list(logging.getLogger(name).filters) for name in filters} == filters


async def write_fragment():
    pass


def unawaited_warnings_after(dropped: bool) -> list[str]:
    """The warnings of coroutines collected unawaited during and after a run whose save failed (or did not)."""
    before = sys.unraisablehook
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            with quiet_failed_saves() as echoes:
                write_fragment()  # collected during the block, with or without a failed save
                echoes.dropped = int(dropped)
        finally:
            sys.unraisablehook = before
        write_fragment()  # a write that never started
        gc.collect()
        warnings.warn("an unrelated runtime warning", RuntimeWarning)
    return [str(w.message) for w in seen]


def test_after_a_failed_save_unawaited_writes_are_not_warned_about():
    assert unawaited_warnings_after(dropped=True) == ["an unrelated runtime warning"]
    assert unawaited_warnings_after(dropped=False) == [
        "coroutine 'write_fragment' was never awaited", "an unrelated runtime warning"]


def test_the_echoes_of_a_checkpoint_that_failed_to_restore_are_dropped_and_nothing_else(caplog):
    before = sys.unraisablehook
    seen = []
    sys.unraisablehook = seen.append
    try:
        with caplog.at_level(logging.INFO):
            reads = quiet_failed_reads("run/checkpoints/4")
            asyncio_log = logging.getLogger("asyncio")
            asyncio_log.error("Task exception was never retrieved", exc_info=ValueError(
                'OUT_OF_RANGE: Error reading "params.wq/0" in OCDBT database at local file "run/checkpoints/4/state/"'))
            asyncio_log.error("Task exception was never retrieved",
                              exc_info=ValueError('Error reading at local file "run/checkpoints/40/state/"'))
            asyncio_log.error("an unrelated error")
            logging.getLogger("absl").info("restoring run/checkpoints/4/state/")  # not an error: kept
            sys.unraisablehook(Unraisable(Exception("Encountered error while reading array index: (). See full "
                                                    "TensorStore details: {'path': 'run/checkpoints/4/state/'}")))
            sys.unraisablehook(Unraisable(Exception("'path': 'run/checkpoints/40/state/'")))
        assert reads.dropped == 2
        assert [r.getMessage() for r in caplog.records] == [
            "Task exception was never retrieved", "an unrelated error", "restoring run/checkpoints/4/state/"]
        assert "checkpoints/40/" in str(caplog.records[0].exc_info[1])
        assert [str(u.exc_value) for u in seen] == ["'path': 'run/checkpoints/40/state/'"]
    finally:
        sys.unraisablehook = before  # the loggers' filters are restored by conftest.py
