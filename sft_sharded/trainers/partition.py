"""Trainable and frozen parameters: one nested dict of params split by a predicate on each leaf's path,
and merged back for the model. With LoRA the adapters train and the base is frozen; in full fine-tuning
nothing is frozen (the frozen tree is None)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Path = tuple[str, ...]


def split(params: Mapping, trainable: Callable[[Path], bool], prefix: Path = ()) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; a sub-dict with no leaf of a side is left out of that side."""
    train, frozen = {}, {}
    for key, value in params.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            t, f = split(value, trainable, path)
            if t:
                train[key] = t
            if f:
                frozen[key] = f
        elif trainable(path):
            train[key] = value
        else:
            frozen[key] = value
    return train, frozen


def merge(a: Mapping | None, b: Mapping | None) -> Any:
    """The union of two nested dicts with disjoint leaves (either may be None)."""
    if b is None:
        return a
    if a is None:
        return b
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = merge(out[key], value)
        else:
            raise ValueError(f"both parameter trees hold {key!r}")
    return out
