"""sft-sharded plan: compile the real train step for a TPU topology on a CPU host, ahead of time.

    sft-sharded plan --topology v5p-64 --model llama3.1-8b --seq 8192 --global-batch 256 --mesh fsdp=-1

Needs the TPU compiler (`pip install sft_sharded[tpu]`, i.e. `jax[tpu]` for the installed jax). Nothing
runs: the state and batch are abstract (shapes + shardings) and `jit(...).lower(...).compile()` reports
per-chip memory and FLOPs. Exits non-zero when the plan does not fit in a chip's HBM.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from sft_sharded.batch import BATCH_KEYS
from sft_sharded.choices import DEFAULT_CONTEXT_SCHEME, LORA_MLP_TARGETS, LORA_TARGETS
from sft_sharded.config import (DataConfig, LoraConfig, LossConfig, MeshConfig, ModelConfig, OptimConfig,
                                TrainConfig)
from sft_sharded.errors import UserError
from sft_sharded.metrics import flops_per_token, memory_per_device, peak_flops
from sft_sharded.models import preset
from sft_sharded.models.attention.choose import Split, choose_kernel
from sft_sharded.parallel import hlo_collectives
from sft_sharded.parallel.sharding import (MESH_AXES, batch_sharding, context_size, data_parallel_size, make_mesh,
                                           mesh_shape)
from sft_sharded.parallel.slices import slice_of_devices
from sft_sharded.run import build_trainer
from sft_sharded.state import abstract_state
from sft_sharded.topology import CHIPS, host_bounds, parse_topology, torus_wrap

def parse_mesh(spec: str, slices: int = 1, dcn_axis: str = "data") -> MeshConfig:
    """"fsdp=-1,tensor=4" -> MeshConfig (axes not named: 1) over `slices` slices."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in sizes:
            raise ValueError(f"--mesh {spec!r}: unknown axis {key!r} (axes: {', '.join(sizes)})")
        sizes[key] = int(value)
    return MeshConfig(**sizes, slices=slices, dcn_axis=dcn_axis)


def _topology_mesh(gen: str, grid: str, mesh: MeshConfig, mesh_spec: str) -> jax.sharding.Mesh:
    """A Mesh over the devices of a TPU topology (no TPU needed), in the order that follows the torus; with
    several slices, the mesh of `sharding.make_mesh` over the slices' devices (each slice in torus order)."""
    # A chip of two TensorCores is one device ("megacore"), as the runtime presents v4 and v5p chips; libtpu's
    # v4 default is a device per core, which jax cannot lay out as a mesh.
    chip = {"chip_config_name": "megacore"} if CHIPS[gen]["cores_per_chip"] == 2 else {}
    topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{gen}:{grid}",
                                        chips_per_host_bounds=host_bounds(grid), num_slices=mesh.slices,
                                        wrap=torus_wrap(gen, grid), **chip)
    shape = mesh_shape(mesh.axis_sizes(), len(topo.devices))
    if mesh.slices > 1:
        return make_mesh(**dict(zip(MESH_AXES, shape)), devices=topo.devices, slices=mesh.slices,
                         dcn_axis=mesh.dcn_axis)
    try:
        physical = topologies.make_mesh(topo, shape, MESH_AXES)
    except NotImplementedError as err:  # a mesh axis that is no product of the torus's axes
        raise UserError(f"--mesh {mesh_spec!r} (sizes {dict(zip(MESH_AXES, shape))}) does not fit the {gen}:{grid} "
                        f"torus: {str(err).split('. ')[0]}") from None
    return jax.sharding.Mesh(physical.devices, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def train_config(model: str, seq: int, global_batch: int, mesh_spec: str, remat: str = "full", scan: bool = True,
                 loss_chunk: int | None = None, attention: str = "auto", lora_rank: int = 0,
                 base_dtype: str = "bfloat16", context_attention: str = DEFAULT_CONTEXT_SCHEME, slices: int = 1,
                 dcn_axis: str = "data", grad_accum: int = 1) -> TrainConfig:
    """The run config the flags stand for: what `sft-sharded train` with these keys would compile."""
    named = preset(model)
    # LoRA on experts is not implemented: a mixture of experts gets adapters on its attention only. Layers
    # of different shapes (Gemma 4) cannot share one scanned body: they are planned unrolled.
    targets = [t for t in LORA_TARGETS if not (named.num_experts and t in LORA_MLP_TARGETS)]
    return TrainConfig(
        model=ModelConfig(preset=model, dtype="bfloat16", remat=remat, scan_layers=scan and not named.layerwise,
                          attention=attention, context_attention=context_attention),
        mesh=parse_mesh(mesh_spec, slices, dcn_axis),
        data=DataConfig(batch_size=global_batch, max_length=seq, packing=True),
        loss=LossConfig(chunk_size=loss_chunk),
        optim=OptimConfig(grad_accum_steps=grad_accum),
        lora=LoraConfig(rank=lora_rank, base_dtype=base_dtype, targets=targets))


def plan(topology: str, model: str, seq: int, global_batch: int, mesh_spec: str, remat: str = "full",
         scan: bool = True, loss_chunk: int | None = None, attention: str = "auto", lora_rank: int = 0,
         base_dtype: str = "bfloat16", context_attention: str = DEFAULT_CONTEXT_SCHEME,
         hlo_file: str | None = None, slices: int = 1, dcn_axis: str = "data", grad_accum: int = 1) -> dict:
    """The train step of `train_config(...)` built by the run module, compiled for `topology`."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # read when the TPU compiler starts: no metadata server
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    run_cfg = train_config(model, seq, global_batch, mesh_spec, remat, scan, loss_chunk, attention, lora_rank,
                           base_dtype, context_attention, slices, dcn_axis, grad_accum)
    gen, grid = parse_topology(topology)
    mesh = _topology_mesh(gen, grid, run_cfg.mesh, mesh_spec)
    _check_split(mesh, global_batch, seq)
    trainer = build_trainer(run_cfg, mesh=mesh)
    cfg = trainer.model.config
    state = abstract_state(trainer, run_cfg)
    batch = {k: jax.ShapeDtypeStruct((global_batch, seq), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=batch_sharding(mesh)) for k in BATCH_KEYS}
    chip, peak, chips = CHIPS[gen], peak_flops(f"TPU {gen}"), mesh.devices.size
    analytic = flops_per_token(cfg, seq) * global_batch * seq / chips
    result = {
        "topology": f"{gen}:{grid}", "slices": slices, "grad_accum": grad_accum, "torus": any(torus_wrap(gen, grid)),
        "chips": chips, "mesh": dict(mesh.shape), "model": model,
        "params": cfg.num_params(), "seq": seq, "global_batch": global_batch, "remat": remat,
        "scan": cfg.scan_layers, "loss_chunk": trainer.loss_chunk_size, "lora_rank": lora_rank,
        "lora_targets": cfg.lora and cfg.lora.targets, "base_dtype": base_dtype, "hbm_bytes": chip["hbm_bytes"],
        "analytic_flops_per_chip": analytic, "step_s_at_peak": analytic / peak,
        "step_s_at_50pct_mfu": 2 * analytic / peak,
    }
    lowered = trainer.lower("train", state, batch)
    with jax.set_mesh(mesh):  # what "auto" means on the target platform, and proof that a kernel is in
        result["attention"] = choose_kernel(attention, cfg.dtype, cfg.head_size, seq, cfg.attn_softcap,
                                            cfg.attention_sinks)
        if context_size(mesh) > 1:  # a split sequence: models/attention/split.py's scheme, a kernel per shard
            split = Split(cfg.context_attention, context_size(mesh), cfg.context_layout)
            kernel = choose_kernel(attention, cfg.dtype, cfg.head_size, seq, cfg.attn_softcap, split=split)
            result["attention"] = f"split sequence ({cfg.context_attention}, {cfg.context_layout}, {kernel} per shard)"
    result["pallas_calls"] = lowered.as_text().count("tpu_custom_call")
    return {**result, **_compile(lowered, chip["hbm_bytes"], hlo_file, mesh)}


def _check_split(mesh, global_batch: int, seq: int) -> None:
    """Rows that the row-splitting axes divide and positions that the context axis divides."""
    if global_batch % data_parallel_size(mesh):
        raise UserError(f"--global-batch {global_batch} does not split over data x fsdp x expert = "
                        f"{data_parallel_size(mesh)} of mesh {dict(mesh.shape)}: use fewer row-splitting devices "
                        "(e.g. a larger context axis) or more rows")
    if seq % context_size(mesh):
        raise UserError(f"--seq {seq} is not divisible by the context axis ({context_size(mesh)} devices)")


def _compile(lowered, hbm_bytes: int, hlo_file: str | None = None, mesh=None) -> dict:
    """`step_stats` of the compiled step, or the TPU compiler's refusal."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        # The TPU compiler itself refuses a program that cannot fit in HBM: that is the answer.
        return {"fits": False, "compiler_error": str(err).splitlines()[0]}
    return step_stats(compiled, hbm_bytes, hlo_file, mesh)


def step_stats(compiled, hbm_bytes: int, hlo_file: str | None = None, mesh=None) -> dict:
    """Per-chip memory, FLOPs and collectives of a compiled step (any system's: benchmarks/tpu_side_by_side.py
    reads MaxText's with it); with `hlo_file`, the optimized HLO module is written there too. The
    collectives that cross slices are counted apart when the program's mesh (`mesh`, else the mesh of its
    first input) spans several."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_chip = memory_per_device(compiled)
    hlo = compiled.as_text()
    if hlo_file:
        with open(hlo_file, "w") as f:
            f.write(hlo)
    return {
        "argument_bytes": memory.argument_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes, "alias_bytes": memory.alias_size_in_bytes,
        "total_bytes_per_chip": per_chip, "fits": per_chip <= hbm_bytes,
        "compiled_flops_per_chip": float(cost.get("flops", float("nan"))),
        "collectives": hlo_collectives.collectives(hlo, _slice_of(compiled, mesh)),
    }


def _slice_of(compiled, mesh) -> list[int] | None:
    """The slice of each logical device id of a program over several slices (None over one)."""
    if mesh is None:
        mesh = next((s.mesh for s in jax.tree.leaves(compiled.input_shardings) if hasattr(s, "mesh")), None)
    if mesh is None:
        return None
    slice_of = slice_of_devices(mesh.devices)
    return slice_of if len(set(slice_of)) > 1 else None


def report(r: dict) -> str:
    gib = 2**30
    head = (f"plan: {r['model']} ({r['params'] / 1e9:.3f}B params) on {r['topology']} "
            f"({r['chips']} chip{'s' * (r['chips'] > 1)}, {'torus' if r['torus'] else 'open mesh'}"
            f"{', %d slices over DCN' % r['slices'] if r.get('slices', 1) > 1 else ''}), "
            f"mesh {r['mesh']}, {r['global_batch']} x {r['seq']} tokens per step"
            f"{' in %d micro-batches' % r['grad_accum'] if r.get('grad_accum', 1) > 1 else ''}, remat {r['remat']}, "
            f"{'scanned' if r['scan'] else 'unrolled'} layers, "
            f"loss chunk {r['loss_chunk'] or 'none (full logits)'}, attention {r['attention']}"
            f"{' (%d Pallas calls)' % r['pallas_calls'] if r.get('pallas_calls') else ''}, "
            + (f"LoRA rank {r['lora_rank']} on {','.join(r['lora_targets'])} over a {r['base_dtype']} base"
               if r["lora_rank"] else "full fine-tuning"))
    timing = (f"  analytic FLOPs per chip per step {r['analytic_flops_per_chip']:.3e}: {r['step_s_at_peak']:.3f} s at "
              f"peak, {r['step_s_at_50pct_mfu']:.3f} s at 50% MFU")
    if "compiler_error" in r:
        return "\n".join([head, f"  DOES NOT FIT: the TPU compiler says: {r['compiler_error']}", timing])
    return "\n".join([
        head,
        f"  per-chip memory: arguments {r['argument_bytes'] / gib:.2f} GiB + temporaries "
        f"{r['temp_bytes'] / gib:.2f} GiB "
        f"+ outputs {r['output_bytes'] / gib:.2f} GiB - aliased {r['alias_bytes'] / gib:.2f} GiB = "
        f"{r['total_bytes_per_chip'] / gib:.2f} GiB of {r['hbm_bytes'] / gib:.0f} GiB HBM -> "
        f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"  FLOPs per chip per step: compiler {r['compiled_flops_per_chip']:.3e}"
        f"{' (a scanned layer body counted once: XLA does not multiply loop trip counts)' if r['scan'] else ''}, "
        f"analytic 6*N*tokens + attention {r['analytic_flops_per_chip']:.3e}",
        f"  {hlo_collectives.report(r['collectives'])}",
        f"  predicted step time: {r['step_s_at_peak']:.3f} s at peak, {r['step_s_at_50pct_mfu']:.3f} s at 50% MFU",
    ])


def main(args) -> int:
    """Print the plan (with --lora-rank: the full fine-tuning plan first, for comparison); exit 1 when the
    requested one does not fit."""
    common = (args.topology, args.model, args.seq, args.global_batch, args.mesh, args.remat, not args.no_scan,
              args.loss_chunk, args.attention)
    layout = dict(slices=args.slices, dcn_axis=args.dcn_axis, grad_accum=args.grad_accum)
    if args.lora_rank:
        print(report(plan(*common, context_attention=args.context_attention, **layout)))
    result = plan(*common, args.lora_rank, args.base_dtype, args.context_attention, args.hlo_file, **layout)
    print(report(result))
    if not result["fits"]:
        need = result.get("compiler_error") or f"{result['total_bytes_per_chip'] / 2**30:.2f} GiB per chip"
        print(f"sft-sharded plan: does not fit in {result['hbm_bytes'] / 2**30:.0f} GiB HBM per chip ({need}); "
              "use more chips, a smaller batch, fsdp, a context axis, or remat", file=sys.stderr)
        return 1
    return 0
