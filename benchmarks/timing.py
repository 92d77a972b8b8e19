"""What the step benchmarks share: the trainer a run would build (`bench_trainer`, through the run module),
and the timing loop: warm-up steps (the first compiles), then the median of the timed ones, each waited for
on the device."""

from __future__ import annotations

import statistics
import time

# The optimizer the published numbers were measured with: AdamW at a constant 1e-4, no clipping.
BENCH_KEYS = ("optim.lr=1e-4", "optim.warmup_steps=0", "optim.schedule=constant", "optim.clip_norm=null",
              "optim.weight_decay=1e-4", "loss.chunk_size=0")


def add_shape_arguments(p) -> None:
    """The model, batch and mesh arguments of the step benchmarks (`model_config` reads them)."""
    from sft_sharded.choices import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

    p.add_argument("--preset")
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 8), ("head-dim", 32), ("kv-heads", 8),
                          ("mlp", 1024), ("vocab", 8192), ("seq", 512), ("batch", 8)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
    p.add_argument("--simulate-devices", type=int, default=0, help="CPU: simulated devices (set before jax)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    p.add_argument("--scan", action="store_true")
    p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLEMENTATIONS)


def model_config(args):
    """The DecoderConfig of `add_shape_arguments`' arguments: a preset, or the shape given."""
    from sft_sharded import DecoderConfig
    from sft_sharded.models import preset

    options = dict(dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat, scan_layers=args.scan,
                   attention=args.attention)
    if args.preset:
        return preset(args.preset, **options)
    return DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.heads, head_dim=args.head_dim, num_kv_heads=args.kv_heads,
                         mlp_dim=args.mlp, tie_embeddings=args.tied, **options)


def synthetic_batch(cfg, rows: int, length: int, mesh):
    """Random token rows, every position a target, placed on the mesh."""
    import numpy as np

    from sft_sharded.parallel.sharding import global_batch

    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (rows, length)).astype(np.int32)
    return global_batch({"input_ids": ids, "labels": np.roll(ids, -1, 1), "loss_mask": np.ones_like(ids, bool)},
                        mesh)


def bench_trainer(model_cfg, rows: int, length: int, *keys: str, mesh=None):
    """`run.build_trainer` for a TrainConfig of BENCH_KEYS, the batch shape and `keys` (KEY=VALUE: mesh.*,
    loss.chunk_size, optim.grad_accum_steps), with the benchmark's own model shape and, where given, its
    own mesh (e.g. one device of several). Imported late: a benchmark sets up simulated devices first."""
    from sft_sharded.config import load_config
    from sft_sharded.run import build_trainer

    cfg = load_config(None, [*BENCH_KEYS, f"data.batch_size={rows}", f"data.max_length={length}", *keys])
    return build_trainer(cfg, model_cfg, mesh=mesh)


def alternate(windows: dict, rounds: int) -> dict[str, list[float]]:
    """Each round times every variant's window (`name -> () -> seconds`) once, the order reversed every other
    round so that none always runs first: a machine's drift reaches all alike. Each variant's seconds per round."""
    times: dict[str, list[float]] = {name: [] for name in windows}
    for round_ in range(rounds):
        for name in list(windows)[:: 1 if round_ % 2 == 0 else -1]:
            times[name].append(windows[name]())
    return times


def summarize(times: dict[str, list[float]], tokens: int, numerator: str, denominator: str):
    """(each variant's median step seconds and tokens/s, each round's ratio of the two variants' step times
    numerator / denominator) of `alternate`'s times; `tokens` per step."""
    per_variant = {name: {"median_step_s": statistics.median(t), "tokens_per_sec": tokens / statistics.median(t)}
                   for name, t in times.items()}
    return per_variant, [a / b for a, b in zip(times[numerator], times[denominator])]


def median_step_s(trainer, state, batch, steps: int, warmup: int = 1):
    """(median seconds per train step after `warmup` untimed steps, the last state, its metrics)."""
    import jax

    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]), state, metrics


def profile_steps(trainer, state, batch, log_dir: str, steps: int, hlo_text: str) -> dict[str, float] | None:
    """Trace `steps` train steps into `log_dir`, print where their kernels' time goes (a table on stderr,
    `sft_sharded.step_profile`) and return the seconds per step of each part; None, with the reason on
    stderr, when the trace cannot be read (a device lease is scarce: the row's other numbers still count)."""
    import sys

    import jax

    from sft_sharded.step_profile import breakdown, format_table, load_trace

    try:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = trainer.train_step(state, batch)
                jax.block_until_ready(metrics)
        parts = breakdown(load_trace(log_dir), hlo_text)
    except Exception as err:  # noqa: BLE001 - reported, and the benchmark's own result still prints
        print(f"profile failed: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    print(format_table(parts, steps), file=sys.stderr)
    per_step = {**parts.seconds, **({} if parts.idle_s is None else {"idle": parts.idle_s})}
    return {part: round(seconds / steps, 6) for part, seconds in per_step.items()}
