"""The echoes of an asynchronous checkpoint save that fails part-way (a disk that fills under a save that
fitted when it started): each of orbax's abandoned writes logs its own traceback through absl and asyncio
(`_SignalingThread.run() raised an exception`, `Task exception was never retrieved`), and tensorstore's
late callbacks into orbax's closed event loop print `Event loop is closed` as unraisable exceptions, a
thousand lines or more for one failure. The failure itself is the run's one line: `Checkpointer.wait`
raises CheckpointNotSaved with its cause. `quiet_failed_saves` keeps the echoes off stderr while a
`train` command runs and counts them; everything else those loggers say passes through.

A checkpoint that fails to restore (a truncated array file) echoes the same way: each of orbax's reads of
it fails on its own, and their exceptions reach asyncio's logger and the unraisable hook as the tasks and
coroutines are collected, some only at exit (seven to fourteen thousand lines of tracebacks for one
truncated file). The checkpoint's one line says it cannot be restored; `quiet_failed_reads` drops, for
the rest of the process, the echoes that name its directory.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import warnings
from collections.abc import Iterator

from sft_sharded.errors import is_full_disk, says_full_disk

TEMP_MARK = "orbax-checkpoint-tmp"  # in orbax's temporary step directory: a write of a save in flight
LOGGERS = ("absl", "asyncio")
# `sys:1: RuntimeWarning: coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited`
UNAWAITED = r"coroutine '.*' was never awaited"


class Echoes(logging.Filter):
    """Drops error records about writes into a temporary checkpoint directory or that failed for space;
    counts what it drops."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            text += str(exc)
        # A writer whose file write failed for space logs an OSError without the file's name (an open that
        # failed names it): the run's one line reports the full disk either way.
        if record.levelno >= logging.ERROR and (TEMP_MARK in text or is_full_disk(exc) or says_full_disk(text)):
            self.dropped += 1
            return False
        return True

    def late_callback(self, unraisable) -> bool:
        """A callback that arrived after its event loop was closed (what an abandoned write leaves)."""
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            self.dropped += 1
            return True
        return False


@contextlib.contextmanager
def quiet_failed_saves() -> Iterator[Echoes]:
    """While the block runs (a whole `train`), the echoes of a failed asynchronous save are dropped. After a
    failed save the filter stays for the rest of the process: asyncio reports an abandoned write's
    exception when its task is collected, and orbax's loop keeps some of them until the process exits. A
    write that never started (a failed or interrupted save) is a coroutine collected unawaited, which
    Python warns about: ignored during the block, and after it until the process exits if a save failed."""
    echoes = Echoes()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addFilter(echoes)
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not echoes.late_callback(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", UNAWAITED, RuntimeWarning)
            try:
                yield echoes
            finally:
                gc.collect()  # what the run abandoned reports now, while the filters are on
    finally:
        if echoes.dropped:
            warnings.filterwarnings("ignore", UNAWAITED, RuntimeWarning)
        else:
            sys.unraisablehook = previous
            for logger in loggers:
                logger.removeFilter(echoes)


class FailedReads(logging.Filter):
    """Drops error records and unraisable exceptions that name one checkpoint directory; counts them."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.mark, self.dropped = directory.rstrip("/") + "/", 0  # "ckpt/4/" is not "ckpt/40/"

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and self.mark in f"{record.getMessage()}{exc or ''}":
            self.dropped += 1
            return False
        return True

    def late_read(self, unraisable) -> bool:
        if self.mark in str(unraisable.exc_value):
            self.dropped += 1
            return True
        return False


def quiet_failed_reads(directory: str) -> FailedReads:
    """From now on in this process, the echoes of the abandoned reads of `directory` (a checkpoint that
    failed to restore, reported in one line by its caller) are dropped. One filter per failed checkpoint:
    a run meets one or two."""
    reads = FailedReads(directory)
    for name in LOGGERS:
        logging.getLogger(name).addFilter(reads)
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not reads.late_read(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    return reads
