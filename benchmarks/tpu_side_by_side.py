"""sft_sharded and MaxText compile the same train step for the same TPU slice, on this CPU host, with the
same jax and libtpu: per-chip memory, the step's FLOPs and its collectives, one JSON line per system.

    python benchmarks/tpu_side_by_side.py 8b                 # both systems, full logits, then the tiled loss
    python benchmarks/tpu_side_by_side.py moe --loss full --system maxtext --global-batch 128
    python benchmarks/tpu_side_by_side.py 8b --slices 2 --loss tiled    # 2 slices over DCN: data spans them

Needs one Python >= 3.12 environment with sft_sharded, `maxtext` and `jax[tpu]` for its jax (MaxText
requires 3.12); nothing runs on a TPU. Each system compiles in its own process (MaxText sets global jax
flags). Both use their defaults otherwise: scanned layers, full remat, bf16 activations over float32
weights and AdamW state, fully sharded data parallel over every chip (ours: fsdp=-1; MaxText:
ici_fsdp_parallelism=-1), splash attention. The loss: "full" materialises the [rows, seq, vocab] logits in
both; "tiled" splits them into seq/1024 pieces in both (ours: --loss-chunk 1024; MaxText:
num_vocab_tiling=seq/1024). Collectives are counted by sft_sharded.parallel.hlo_collectives for both.
With --slices N the same topology is compiled N times over DCN (get_topology_desc(num_slices=N)), the
data axis spanning the slices and FSDP inside each (ours: --mesh data=N,fsdp=-1; MaxText:
compile_topology_num_slices=N, whose dcn_data_parallelism=-1 puts the slices on data); the global batch is
the row's times N, and the bytes sent over DCN are counted apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from sft_sharded.parallel.hlo_collectives import KINDS

# row -> (sft_sharded preset, MaxText model_name, topology, seq, global batch)
ROWS = {
    "8b": ("llama3.1-8b", "llama3.1-8b", "v5p-64", 8192, 256),
    "70b": ("llama3.1-70b", "llama3.1-70b", "v5p-128", 8192, 128),
    "moe": ("qwen3-30b-a3b", "qwen3-30b-a3b", "v5p-32", 4096, 64),
}
TILE = 1024  # positions per loss piece


def ours(row: str, loss: str, global_batch: int, hlo_file: str | None, slices: int = 1) -> dict:
    from sft_sharded.plan import plan

    model, _, topology, seq, _ = ROWS[row]
    mesh = "fsdp=-1" if slices == 1 else f"data={slices},fsdp=-1"
    r = plan(topology, model, seq, global_batch, mesh, remat="full", loss_chunk=TILE if loss == "tiled" else 0,
             hlo_file=hlo_file, slices=slices)
    keys = ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "total_bytes_per_chip",
            "compiled_flops_per_chip", "collectives", "compiler_error", "attention", "fits")
    return {k: r[k] for k in keys if k in r}


def maxtext(row: str, loss: str, global_batch: int, hlo_file: str | None, slices: int = 1) -> dict:
    import maxtext
    from maxtext.trainers.pre_train import train_compile

    from sft_sharded.plan import step_stats
    from sft_sharded.topology import CHIPS, parse_topology

    _, model, topology, seq, _ = ROWS[row]
    gen, grid = parse_topology(topology)  # v5p-64 names cores; MaxText's batch is per chip
    per_chip = global_batch / math.prod(int(n) for n in grid.split("x")) / slices
    config = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    argv = [None, config, f"model_name={model}", f"compile_topology={topology}",
            f"compile_topology_num_slices={slices}", f"per_device_batch_size={per_chip:g}",
            f"max_target_length={seq}", "remat_policy=full",
            "dataset_type=synthetic", "enable_checkpointing=false", "skip_jax_distributed_system=true",
            f"base_output_directory={tempfile.mkdtemp()}", "run_name=side_by_side",
            f"num_vocab_tiling={seq // TILE if loss == 'tiled' else 1}"]
    captured = {}
    compile_step = train_compile.jit_and_compile

    def keep(*args, **kwargs):
        captured["compiled"] = compile_step(*args, **kwargs)
        return captured["compiled"]

    train_compile.jit_and_compile = keep
    try:
        train_compile.main(argv)
    except Exception as err:  # the TPU compiler's refusal of a step that does not fit is the answer
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return {"compiler_error": str(err).splitlines()[0]}
    return step_stats(captured["compiled"], CHIPS[gen]["hbm_bytes"], hlo_file)


def run_one(system: str, row: str, loss: str, global_batch: int, hlo_dir: str | None, slices: int = 1) -> dict:
    """One system's numbers, compiled in a child process so that neither sees the other's jax flags."""
    start = time.time()
    cmd = [sys.executable, __file__, row, "--system", system, "--loss", loss, "--global-batch", str(global_batch),
           "--slices", str(slices), "--child"] + (["--hlo-dir", hlo_dir] if hlo_dir else [])
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", DECOUPLE_GCLOUD="TRUE",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # no lockfile fight with another compile on this host
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{system} {row} {loss}: exit {done.returncode}\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"system": system, "row": row, "loss": loss, "global_batch": global_batch, "slices": slices,
            "compile_wall_s": round(time.time() - start, 1), **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("row", choices=sorted(ROWS))
    p.add_argument("--system", default="both", choices=("both", "ours", "maxtext"))
    p.add_argument("--loss", default="both", choices=("both", "full", "tiled"))
    p.add_argument("--global-batch", type=int, default=None, help="default: the row's")
    p.add_argument("--hlo-dir", default=None, help="also write each optimized HLO module here, to read")
    p.add_argument("--slices", type=int, default=1, help="slices of the row's topology, joined over DCN")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    global_batch = args.global_batch or ROWS[args.row][4] * args.slices
    if args.child:
        with open(os.devnull, "w") as quiet:  # MaxText prints its config; the last stdout line is ours
            real, sys.stdout = sys.stdout, quiet
            hlo_file = args.hlo_dir and os.path.join(args.hlo_dir, f"{args.system}_{args.row}_{args.loss}.hlo.txt")
            result = (ours if args.system == "ours" else maxtext)(args.row, args.loss, global_batch, hlo_file,
                                                                  args.slices)
            sys.stdout = real
        print(json.dumps(result))
        return
    results = []
    for loss in ("full", "tiled") if args.loss == "both" else (args.loss,):
        for system in ("ours", "maxtext") if args.system == "both" else (args.system,):
            results.append(run_one(system, args.row, loss, global_batch, args.hlo_dir, args.slices))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))


def table(results: list[dict]) -> str:
    """The README's rows: GiB per chip, the compiler's FLOPs (a scanned body counted once, in both), and
    GiB of collectives per chip per step (count in brackets)."""
    gib = 2**30
    lines = ["| row | loss | system | arguments + temporaries = total per chip | compiler TFLOPs | "
             + " | ".join(KINDS) + " | collectives total | of which DCN |", "|---" * (7 + len(KINDS)) + "|"]
    for r in results:
        slices = f" x {r['slices']} slices" if r.get("slices", 1) > 1 else ""
        head = f"| {r['row']}{slices} [{r['global_batch']}] | {r['loss']} | {r['system']} |"
        if "compiler_error" in r:
            lines.append(f"{head} does not fit: {r['compiler_error'][:80]} |" + " |" * (3 + len(KINDS)))
            continue
        c = r["collectives"]
        lines.append(f"{head} {r['argument_bytes'] / gib:.2f} + {r['temp_bytes'] / gib:.2f} = "
                     f"**{r['total_bytes_per_chip'] / gib:.2f} GiB** | {r['compiled_flops_per_chip'] / 1e12:.1f} | "
                     + " | ".join(f"{c[k]['bytes'] / gib:.2f} ({c[k]['count']})" for k in KINDS)
                     + f" | **{sum(v['bytes'] for v in c.values()) / gib:.2f} GiB** | "
                     + f"{sum(v.get('dcn_bytes', 0.0) for v in c.values()) / gib:.3f} GiB "
                     + f"({sum(v.get('dcn_count', 0) for v in c.values())}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
