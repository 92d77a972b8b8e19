"""Libraries the tests compare against or drive that a plain install does not have (transformers, torch,
PEFT, libtpu, gcsfs, the trackers): `make test` installs them all."""

import importlib
import os

import pytest


def optional(name: str):
    """The module `name`: a skip where it is not installed, but a failure in CI, which must run every test."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)
