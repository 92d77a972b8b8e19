"""The one file-system layer for every path a user names: data, model and tokenizer directories, the run
directory (checkpoints, metrics, final params) and export targets.

It is etils `epath` because orbax and grain already take `epath.Path`: one notion of a path from the config
to the checkpoint, and no second file-system library. A local path stays a plain local path; `gs://`,
`s3://` and `az://` go through fsspec (`gcsfs`, `s3fs`, `adlfs`), and orbax writes checkpoint tensors there
with tensorstore's own drivers. Other URL schemes are refused by name rather than read as relative local
paths (`memory://x` would otherwise become a folder called `memory:`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from etils import epath

from sft_sharded.errors import UserError, first_line

# scheme -> (the fsspec implementation epath needs for it, how to install it)
REMOTE = {"gs://": ("gcsfs", "pip install 'sft_sharded[gcs]'"), "s3://": ("s3fs", "pip install s3fs"),
          "az://": ("adlfs", "pip install adlfs")}
_WILDCARD = re.compile(r"[*?\[]")
FIRST_ACCESS_TIMEOUT_S = 30.0  # how long a bucket may take to answer a run's first access to it


def is_remote(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(tuple(REMOTE))


def path(value: str | os.PathLike, key: str = "path") -> epath.Path:
    """`value` as an `epath.Path`; `key` (the config key or flag) names it in errors."""
    text = os.fspath(value)
    scheme = text.partition("://")[0] + "://" if "://" in text else None
    if scheme is not None and scheme not in REMOTE:
        raise UserError(f"{key}={text!r}: unsupported URL scheme {scheme!r} (local paths and "
                        f"{', '.join(REMOTE)} are supported)")
    if scheme is not None and importlib.util.find_spec(REMOTE[scheme][0]) is None:
        package, install = REMOTE[scheme]
        raise UserError(f"{key}={text!r}: {scheme} paths need the {package} package: {install}")
    return epath.Path(text)


def absolute(value: str | os.PathLike, key: str = "path") -> epath.Path:
    """A path orbax can take: remote paths as they are, local ones made absolute."""
    p = path(value, key)
    return p if is_remote(p) else epath.Path(Path(p).absolute())


def has_wildcard(pattern: str) -> bool:
    return _WILDCARD.search(pattern) is not None


def _split_at_wildcard(pattern: str) -> tuple[str, str]:
    """(the folders above the first part with a wildcard, the rest of the pattern); none: (pattern, "")."""
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if _WILDCARD.search(part)), len(parts))
    return "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "."), "/".join(parts[first:])


def glob(pattern: str, key: str = "path") -> list[epath.Path]:
    """The sorted matches of a glob pattern, local or remote (the pattern may name a bucket's folders)."""
    base, rest = _split_at_wildcard(pattern)
    if base.endswith(":/"):  # "gs://bucket" split on "/" leaves "gs:" and "" first
        raise UserError(f"{key}={pattern!r}: a wildcard in the bucket name cannot be listed")
    if "**" in pattern:  # epath refuses recursive patterns (one listing per folder of a bucket)
        raise UserError(f"{key}={pattern!r}: '**' is not supported; name each level (e.g. data/*/*.jsonl)")
    return sorted(path(base, key).glob(rest), key=str)


def bounded(action: Callable[[], None], target: str, key: str, timeout_s: float | None = None) -> None:
    """Run a first access to a bucket (`action`) for at most `timeout_s`: without a network or credentials
    fsspec's clients retry for minutes before a deep traceback. Past the time, or on an error, one line
    names the bucket, what failed and which credentials were found."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            action()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread, which reports it
            outcome.append(err)
        else:
            outcome.append(None)

    worker = threading.Thread(target=run, daemon=True)  # left behind on a timeout; it ends with the process
    worker.start()
    timeout_s = FIRST_ACCESS_TIMEOUT_S if timeout_s is None else timeout_s
    worker.join(timeout_s)
    if outcome and outcome[0] is None:
        return
    what = first_line(outcome[0]) if outcome else f"no answer in {timeout_s:.0f} s"
    raise UserError(f"{key}={target!r}: the bucket cannot be reached ({what}); {_credentials(target)}") from None


def reach(value: str, key: str) -> None:
    """A first access, bounded, to a bucket path the run will read (its folder above any wildcard): one line
    naming the key and the bucket when it does not answer, before anything is compiled or written."""
    if not is_remote(value):
        return
    target = path(_split_at_wildcard(value)[0], key)
    bounded(lambda: target.exists(), value, key)


def require_gcs_credentials(target: str, key: str) -> None:
    """Writing to gs:// needs credentials: refuse at once when there are none (before any retry). A GCS
    emulator (`STORAGE_EMULATOR_HOST`, which gcsfs honours) takes writes without them."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    found = _credentials(target) if target.startswith("gs://") else ""
    if found.startswith("no Google Cloud credentials"):
        raise UserError(f"{key}={target!r}: writing to a bucket needs credentials, and {found}")


def _credentials(target: str) -> str:
    """Which credentials a gs:// access would use, for the error line (others: the scheme's own rules)."""
    if not target.startswith("gs://"):
        return "check the network and the credentials of that storage"
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return f"credentials: GOOGLE_APPLICATION_CREDENTIALS={os.environ['GOOGLE_APPLICATION_CREDENTIALS']}"
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        google.auth.default()
    except DefaultCredentialsError:
        return ("no Google Cloud credentials were found (set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth "
                "application-default login`)")
    except ImportError:
        return "google-auth is not installed"
    return "credentials were found (application default): check the network and the bucket's permissions"
