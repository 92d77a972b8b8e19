"""Exceptions for the user's mistakes, as opposed to bugs in this package.

A `UserError` is raised where a mistake is found (a config key, a data file and line, a model directory,
a run directory) with a message that names that place. The CLI prints it as one line,
`sft-sharded: error: <message>`, and exits with `exit_code`; any other exception is a bug and keeps its
traceback. Each class also derives from the builtin a Python caller would expect (`ValueError`,
`FileNotFoundError`), so library users can catch either.
"""

from __future__ import annotations

import errno


FULL_DISK_TEXTS = ("No space left", "RESOURCE_EXHAUSTED", "ENOSPC")


def says_full_disk(text: str) -> bool:
    return any(s in text for s in FULL_DISK_TEXTS)


def is_full_disk(err: BaseException | None) -> bool:
    """A write failed for want of space: ENOSPC itself, or a library's error that says so in its text
    (TensorStore and orbax wrap the OSError in their own exceptions)."""
    return err is not None and (getattr(err, "errno", None) == errno.ENOSPC or says_full_disk(str(err)))


def first_line(err: BaseException, limit: int = 200, with_type: bool = True) -> str:
    """`Type: first line of the message`, for one error line about a library's failure (TensorStore,
    orbax, fsspec and XLA messages run to many lines; TensorStore's end with a repr of its spec)."""
    text = str(err).split(" See full TensorStore details")[0].strip()
    line = text.splitlines()[0][:limit] if text else ""
    if not with_type:
        return line or type(err).__name__
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


class UserError(ValueError):
    """Bad input from the user: config, data, tokenizer, model or run directory, batch."""

    exit_code = 2


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (or a glob matches nothing)."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm stopped being finite; the newest checkpoint is the last good state."""

    exit_code = 1

    def __init__(self, step: int, what: str):
        super().__init__(f"step {step}: {what}; training stopped before saving this state")
        self.step = step


class CheckpointNotSaved(UserError):
    """A checkpoint could not be written (a full disk, a lost bucket): the run stops with the last good
    checkpoint intact and the failed one's temporary directory removed. Not a mistake in the input, but
    the fix (space, permissions) is the user's, so it is one line too."""
