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


class EchoFilter(logging.Filter):
    """Drops the error records of the absl and asyncio loggers, and the unraisable exceptions, that a
    subclass's rule calls echoes; counts what it drops. `install` puts it on both, `uninstall` takes it off."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped, self._previous_hook = 0, None

    def is_echo(self, text: str, exc: BaseException | None) -> bool:
        """An error record's message with its exception's text appended, and the exception."""
        raise NotImplementedError

    def is_late_echo(self, exc: BaseException | None) -> bool:
        raise NotImplementedError

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and self.is_echo(f"{record.getMessage()}{exc or ''}", exc):
            self.dropped += 1
            return False
        return True

    def _hook(self, unraisable) -> None:
        if self.is_late_echo(unraisable.exc_value):
            self.dropped += 1
        else:
            self._previous_hook(unraisable)

    def install(self) -> None:
        for name in LOGGERS:
            logging.getLogger(name).addFilter(self)
        self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._hook

    def uninstall(self) -> None:
        sys.unraisablehook = self._previous_hook
        for name in LOGGERS:
            logging.getLogger(name).removeFilter(self)


class Echoes(EchoFilter):
    """The echoes of a failed save: error records about writes into a temporary checkpoint directory or
    that failed for space, and callbacks that arrived after their event loop was closed."""

    def is_echo(self, text: str, exc: BaseException | None) -> bool:
        # A writer whose file write failed for space logs an OSError without the file's name (an open that
        # failed names it): the run's one line reports the full disk either way.
        return TEMP_MARK in text or is_full_disk(exc) or says_full_disk(text)

    def is_late_echo(self, exc: BaseException | None) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


@contextlib.contextmanager
def quiet_failed_saves() -> Iterator[Echoes]:
    """While the block runs (a whole `train`), the echoes of a failed asynchronous save are dropped. After a
    failed save the filter stays for the rest of the process: asyncio reports an abandoned write's
    exception when its task is collected, and orbax's loop keeps some of them until the process exits. A
    write that never started (a failed or interrupted save) is a coroutine collected unawaited, which
    Python warns about: ignored during the block, and after it until the process exits if a save failed."""
    echoes = Echoes()
    echoes.install()
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
            echoes.uninstall()


class FailedReads(EchoFilter):
    """The echoes of the reads of one checkpoint that failed to restore: whatever names its directory."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.mark = directory.rstrip("/") + "/"  # "ckpt/4/" is not "ckpt/40/"

    def is_echo(self, text: str, exc: BaseException | None) -> bool:
        return self.mark in text

    def is_late_echo(self, exc: BaseException | None) -> bool:
        return self.mark in str(exc)


def quiet_failed_reads(directory: str) -> FailedReads:
    """From now on in this process, the echoes of the abandoned reads of `directory` (a checkpoint that
    failed to restore, reported in one line by its caller) are dropped. One filter per failed checkpoint:
    a run meets one or two."""
    reads = FailedReads(directory)
    reads.install()
    return reads
