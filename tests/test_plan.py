"""The plan's model of a TPU slice's links (compiling a plan needs libtpu: tests/test_distributed.py)."""

import pytest

from sft_sharded.topology import parse_topology, torus_wrap


@pytest.mark.parametrize("name, wrap", [
    # The Cloud TPU v5p page: slices of one 4x4x4 cube and more are full 3-D tori, smaller ones are not.
    ("v5p-8", (False,) * 3), ("v5p-16", (False,) * 3), ("v5p-64", (False,) * 3),
    ("v5p-128", (True,) * 3), ("v5p-256", (True,) * 3), ("v5p:8x8x16", (True,) * 3), ("v4:4x4x12", (True,) * 3),
    ("v4:2x4x4", (False,) * 3),
    # 2-D chips: only the full 16x16 pod closes its two axes into rings.
    ("v6e-256", (True, True, False)), ("v5e:16x16", (True, True, False)), ("v6e:8x16", (False,) * 3),
    ("v5e-4", (False,) * 3),
])
def test_torus_wrap_follows_the_published_slice_shapes(name, wrap):
    assert torus_wrap(*parse_topology(name)) == wrap
