"""step_profile: kernel time attributed to the step's parts, on a hand-written trace whose answer is worked
out here, and on a real trace of a compiled train step."""

import jax
import jax.numpy as jnp
import optax
from reference import random_batch

from sft_sharded import Decoder, SFTTrainer, make_mesh
from sft_sharded.step_profile import breakdown, format_table, load_trace, op_names, part_of

HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_computation.1 (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %exponential.1 = f32[4]{0} exponential(%param_0), metadata={op_name="jit(step)/jvp(loss)/exp"}
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %dot.2 = f32[4]{0} dot(%p, %p), metadata={op_name="jit(step)/transpose(jvp(Decoder))/layers/mlp/dot_general"}
  ROOT %t = (s32[], f32[4]{0}) tuple(%p, %dot.2)
}

ENTRY %main (x: f32[4]) -> f32[] {
  %x = f32[4]{0} parameter(0)
  %fusion.1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  %dot.7 = f32[4]{0} dot(%x, %x), metadata={op_name="jit(step)/jvp(Decoder)/layers/attn/attn._attend/dot_general"}
  %convert.3 = bf16[4]{0} convert(%dot.7)
  %while.1 = (s32[], f32[4]{0}) while(%x), condition=%cond, body=%body
  %all-gather.4 = f32[32]{0} all-gather(%x), dimensions={0}
  %add.9 = f32[4]{0} add(%x, %x), metadata={op_name="jit(step)/optimizer/add"}
  %constant.1 = f32[] constant(0)
  ROOT %broadcast.2 = f32[4]{0} broadcast(%constant.1), dimensions={}
}
"""


def _kernel(op, ts, dur, pid=1, tid=1, module="jit_step", name=None):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name or op,
            "args": {"hlo_op": op, "hlo_module": module}}


def test_op_names_follow_fusions_and_operands_and_parts_split_by_pass():
    names = op_names(HLO)
    assert names["fusion.1"] == "jit(step)/jvp(loss)/exp"  # its called computation's root
    assert names["convert.3"] == names["dot.7"]  # a convert the compiler added: its operand's
    assert names["while.1"] == "jit(step)/transpose(jvp(Decoder))/layers/mlp/dot_general"  # its body's
    assert "broadcast.2" not in names  # a constant's broadcast names nothing
    assert part_of("fusion.1", names["fusion.1"]) == "loss (forward)"
    assert part_of("dot.7", names["dot.7"]) == "attention (forward)"
    assert part_of("add.9", names["add.9"]) == "optimizer"
    assert part_of("all-gather.4", None) == "collectives"
    assert part_of("x", "jit(step)/transpose(jvp(Decoder))/layers/mlp_norm/mul") == "norms (backward)"


def test_breakdown_counts_self_time_per_part_and_a_devices_idle_time():
    process = {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}}
    events = [
        process,
        # A CPU thread: the loop's event encloses a body kernel (20 us) and counts for nothing itself (its
        # body may run on other threads); a rendezvous wait inside the all-gather (no hlo_op) stays the
        # all-gather's.
        _kernel("while.1", 0, 50), _kernel("dot.2", 10, 20),
        _kernel("all-gather.4", 60, 30), {"ph": "X", "pid": 1, "tid": 1, "ts": 65, "dur": 20, "name": "Wait"},
        _kernel("broadcast.2", 95, 5),
        _kernel("add.9", 0, 40, module="jit_other"),  # another program's kernel: not counted
        # A GPU with two streams: kernels cover [100, 134) and [140, 160) of [100, 160): 6 us idle. The
        # kernel without an hlo_op (replayed from a CUDA graph) is busy time, unattributed.
        _kernel("fusion.1", 100, 20, pid=2, tid=7), _kernel("dot.7", 110, 20, pid=2, tid=8),
        {"ph": "X", "pid": 2, "tid": 8, "ts": 130, "dur": 4, "name": "gemm_kernel"},
        _kernel("convert.3", 140, 20, pid=2, tid=7),
        # The host launches the program for each step (once per device, too); the host's time between the
        # steps (here 160 to 2100) is not the device's idle time.
        {"ph": "X", "pid": 1, "tid": 9, "ts": 95, "dur": 1, "name": "CommonPjRtLoadedExecutable::Execute (jit_step)"},
        {"ph": "X", "pid": 1, "tid": 9, "ts": 96, "dur": 1, "name": "[0] CommonPjRtLoadedExecutable::Execute (jit_step)"},
        {"ph": "X", "pid": 1, "tid": 9, "ts": 2000, "dur": 1, "name": "CommonPjRtLoadedExecutable::Execute (jit_step)"},
        _kernel("fusion.1", 2100, 10, pid=2, tid=7),
    ]
    parts = breakdown(events, HLO)
    expected = {"mlp (backward)": 20e-6,  # the dot in the loop's body
                "collectives": 30e-6, "unattributed": 5e-6 + 4e-6, "loss (forward)": 20e-6 + 10e-6,
                "attention (forward)": 40e-6}
    assert parts.seconds.keys() == expected.keys()
    for part, seconds in expected.items():
        assert abs(parts.seconds[part] - seconds) < 1e-12, part
    assert abs(parts.idle_s - 6e-6) < 1e-12
    assert abs(parts.span_s - 2110e-6) < 1e-12
    assert parts.unattributed == {"broadcast.2": 5e-6, "gemm_kernel": 4e-6}
    table = format_table(parts, steps=1)
    assert table.splitlines()[1].startswith("attention (forward)") and "idle (between kernels)" in table


def test_a_traced_train_step_is_attributed_to_the_models_parts(tiny_config, tmp_path):
    trainer = SFTTrainer(Decoder(tiny_config), optax.adamw(1e-3), mesh=make_mesh(1, 8, 1))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    batch = random_batch(0)
    hlo = trainer.lower("train", state, batch).compile().as_text()
    state, metrics = trainer.train_step(state, batch)  # compiled and run once before the trace
    jax.block_until_ready(metrics)
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
    parts = breakdown(load_trace(str(tmp_path)), hlo)
    compute = sum(parts.seconds.values()) - parts.seconds["collectives"]  # 8 threads' waits dominate the rest
    for part in ("loss (forward)", "loss (backward)", "attention (forward)", "attention (backward)",
                 "mlp (forward)", "mlp (backward)", "optimizer", "collectives"):
        assert parts.seconds.get(part, 0) > 0, (part, parts.seconds)
    # The kernels' instructions are found in the compiled program: little is left without a part.
    assert (parts.seconds.get("unattributed", 0) + parts.seconds.get("other", 0)) / compute < 0.25, parts.seconds
    assert parts.idle_s is None  # CPU threads: no device stream
