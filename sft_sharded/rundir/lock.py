"""One run at a time per run directory: `<run_dir>/.lock` names the host and pid of the run that holds it.

Two runs writing one directory interleave `metrics.jsonl`, save checkpoints beyond `checkpoint.keep` and
delete each other's temporary checkpoint directories; the second run is refused at once instead. The file
is created with `O_EXCL` (atomic on a local or network file system) and removed when the run ends. A lock
left by a process that died (kill -9, a crash of the machine) is stale: on the same host its pid is no
longer alive, and it is taken over with a warning. A lock from another host cannot be checked from here;
the error says which file to delete once that run is known to be gone. In a bucket the lock is a
conditional create (fsspec's mode="create"; gcsfs sends Cloud Storage's ifGenerationMatch=0, which the
store itself refuses when the object exists; other stores get what their fsspec library does for it).
Process 0 of a multi-host run takes the lock, and its verdict is shared (`distributed.on_first_process`):
every process stops with the same line when it is refused.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable

from etils import epath

from sft_sharded.rundir import paths
from sft_sharded.errors import UserError

LOCK_NAME = ".lock"


class RunDirInUse(UserError):
    """Another run holds the run directory."""


def _holder(lock: epath.Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):  # being written or removed right now, or not ours: described as unknown
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _stale(holder: dict) -> bool:
    """Whether the holder is a process of this host that is gone."""
    return holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not _alive(
        holder["pid"])


def _refusal(run_dir: epath.Path, lock: epath.Path, holder: dict) -> RunDirInUse:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
    return RunDirInUse(f"run_dir={str(run_dir)!r} is in use by pid {holder.get('pid', '?')} on host "
                       f"{holder.get('host', '?')} since {since} ({lock}); wait for that run to end or choose "
                       "another run_dir (delete the lock file only if that run is gone)")


def check_free(run_dir: str | os.PathLike) -> None:
    """Refuse at once when a live run holds `run_dir` (before the start-up checks, which take a while)."""
    lock = paths.path(run_dir, "run_dir") / LOCK_NAME
    if lock.exists():
        holder = _holder(lock)
        if not _stale(holder):
            raise _refusal(paths.path(run_dir, "run_dir"), lock, holder)


class RunLock:
    """Held from `acquire` to `release` (a context manager too)."""

    def __init__(self, run_dir: str | os.PathLike, warn: Callable[[str], None] = print):
        self.run_dir = paths.path(run_dir, "run_dir")
        self.path = self.run_dir / LOCK_NAME
        self.warn = warn
        self.held = False

    def _create(self, text: str) -> bool:
        """Write the lock unless one exists; False when one does."""
        if paths.is_remote(self.path):
            import fsspec  # installed with gcsfs (the [gcs] extra), which bucket paths need

            fs, key = fsspec.core.url_to_fs(str(self.path))
            try:  # gcsfs sends ifGenerationMatch=0: Cloud Storage itself refuses a second create
                fs.pipe_file(key, text.encode(), mode="create")
            except FileExistsError:
                return False
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def acquire(self) -> RunLock:
        text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        for _ in range(2):  # a stale lock is removed once, then created again
            if self._create(text):
                self.held = True
                return self
            holder = _holder(self.path)
            if not _stale(holder):
                raise _refusal(self.run_dir, self.path, holder)
            self.warn(f"warning: {self.path} was left by pid {holder['pid']}, which is no longer running on "
                      "this host; taking the run directory over")
            self.path.unlink(missing_ok=True)
        raise _refusal(self.run_dir, self.path, _holder(self.path))

    def release(self) -> None:
        if self.held and _holder(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
