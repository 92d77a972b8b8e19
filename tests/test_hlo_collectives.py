"""Collective counts and bytes from optimized HLO, against sizes worked out by hand from the shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from sft_sharded.parallel.hlo_collectives import collectives, report, type_bytes

# A hand-written module in the form the compilers print: asynchronous pairs, a combined (tuple) all-gather,
# an op in an async wrapper's callee and a loop body run 4 times.
MODULE = """HloModule jit_step

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], bf16[256,1024])) -> (s32[], bf16[256,1024]) {
  %p = (s32[], /*index=1*/bf16[256,1024]{1,0}) parameter(0)
  %w = bf16[256,1024]{1,0} get-tuple-element(%p), index=1
  %ag-start = (bf16[256,1024]{1,0}, bf16[2048,1024]{1,0}) all-gather-start(%w), channel_id=1, dimensions={0}
  %ag-done = bf16[2048,1024]{1,0} all-gather-done(%ag-start)
  %rs = bf16[256,1024]{1,0} reduce-scatter(%ag-done), channel_id=2, dimensions={0}, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], bf16[256,1024]{1,0}) tuple(%i, %rs)
}

%cond (c: (s32[], bf16[256,1024])) -> pred[] {
  %c = (s32[], bf16[256,1024]{1,0}) parameter(0)
  %n = s32[] constant(4)
  %i.1 = s32[] get-tuple-element(%c), index=0
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

%wrapped (a: f32[8,8]) -> f32[8,8] {
  %a = f32[8,8]{1,0} parameter(0)
  ROOT %ar = f32[8,8]{1,0} all-reduce(%a), channel_id=3, to_apply=%add
}

ENTRY %main (w0: bf16[256,1024], v: f32[8,8], u: f32[16], s: f32[4]) -> f32[8,8] {
  %w0 = bf16[256,1024]{1,0} parameter(0)
  %v = f32[8,8]{1,0} parameter(1)
  %u = f32[16]{0} parameter(2)
  %s = f32[4]{0} parameter(3)
  %init = (s32[], bf16[256,1024]{1,0}) tuple(%w0, %w0)
  %loop = (s32[], bf16[256,1024]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %both = (f32[64]{0}, f32[16]{0}) all-gather(%u, %s), channel_id=4, dimensions={0}
  %cp-start = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(%u), channel_id=5
  %cp-done = f32[16]{0} collective-permute-done(%cp-start)
  %async = ((f32[8,8]{1,0}), f32[8,8]{1,0}, s32[]) async-start(%v), calls=%wrapped
  %async-done = f32[8,8]{1,0} async-done(%async), calls=%wrapped
  ROOT %out = f32[8,8]{1,0} copy(%async-done)
}
"""


@pytest.mark.parametrize("trips", ["known_trip_count", "condition"])
def test_hand_written_module_counts_each_run_and_its_larger_buffer(trips):
    """The loop runs 4 times: XLA says so on CPU; the TPU compiler's text has only the condition i < 4."""
    module = MODULE if trips == "known_trip_count" else MODULE.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
    assert module != MODULE or trips == "known_trip_count"
    got = collectives(module)
    gathered = 2048 * 1024 * 2  # bf16[2048, 1024], four times (the loop)
    assert got["all-gather"] == {"count": 4 + 1, "bytes": 4 * gathered + (64 + 16) * 4}
    assert got["reduce-scatter"] == {"count": 4, "bytes": 4 * gathered}  # its unscattered input
    assert got["all-reduce"] == {"count": 1, "bytes": 8 * 8 * 4}  # once, though start and done name it
    assert got["collective-permute"] == {"count": 1, "bytes": 16 * 4 + 2 * 4}  # output + its two u32 flags
    assert got["all-to-all"] == {"count": 0, "bytes": 0.0}
    assert "all-gather 5 x" in report(got)


def test_type_bytes_of_arrays_and_tuples():
    assert type_bytes("bf16[3,5]{1,0}") == 30
    assert type_bytes("(f32[2]{0}, s8[7]{0}, pred[])") == 8 + 7 + 1
    assert type_bytes("u4[10]") == 5


def test_compiled_scan_over_eight_devices():
    """A real compiled program: a 3-step scan whose body all-gathers a weight shard and psums a [4, 32]
    float32 block (shard_map, so the ops are the ones written), then one all-to-all outside the loop."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))

    def per_device(w_Lx4x32, h_4x32):
        def body(h, w):
            full_32x32 = jax.lax.all_gather(w, "x", tiled=True)
            return jax.lax.psum(h @ full_32x32, "x"), None

        h, _ = jax.lax.scan(body, h_4x32, w_Lx4x32)
        return jax.lax.all_to_all(h, "x", 1, 1, tiled=True)

    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(None, "x"), P()), out_specs=P(None, "x")))
    w = np.ones((3, 32, 32), np.float32)
    h = np.ones((4, 32), np.float32)
    got = collectives(step.lower(w, h).compile().as_text())
    assert got["all-gather"] == {"count": 3, "bytes": 3 * 32 * 32 * 4}
    assert got["all-reduce"] == {"count": 3, "bytes": 3 * 4 * 32 * 4}
    assert got["all-to-all"] == {"count": 1, "bytes": 4 * 32 * 4}
    assert got["reduce-scatter"]["count"] == 0 and got["collective-permute"]["count"] == 0
    assert jnp.allclose(step(w, h), (32 * 8) ** 3)  # x32 per matmul, x8 per psum: the program described
