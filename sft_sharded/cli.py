"""sft-sharded train [--config FILE.yaml] [KEY=VALUE ...]

Argument parsing, printing and exit codes; the run itself is assembled in `sft_sharded.run`. jax is
imported only after the config is read, so `simulate_devices` can set up CPU devices first. A user's
mistake (`errors.UserError`) prints one line, `sft-sharded: error: ...`, and exits with its code (2, or 1
for a diverged run); any other exception is a bug and keeps its traceback (`--debug` shows it always).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys

from sft_sharded.rundir import paths
from sft_sharded.choices import (ATTENTION_IMPLEMENTATIONS, CONTEXT_SCHEMES, DEFAULT_CONTEXT_SCHEME, LORA_BASE_DTYPES,
                                 REMAT_POLICIES)
from sft_sharded.config import TrainConfig, load_config
from sft_sharded.parallel.devices import cpu_only_host, simulate_cpu_devices
from sft_sharded.errors import UserError


class StopSignals:
    """SIGTERM (and, on multi-host TPU, jax's preemption sync point) and Ctrl-C ask the loop to save and stop
    at the next step boundary; `reached(step)` is what the loop asks, and says why. A second Ctrl-C, or one
    before the first step has run (nothing to save yet), stops at once. The previous handlers come back on
    `restore`."""

    def __init__(self, say):
        self.reason: str | None = None
        self.training = False
        self.stopped = False  # the loop was told to stop (a signal after its last step changes nothing)
        self._say = say
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if not self.training or self.reason == "interrupted":
                raise KeyboardInterrupt
            self.reason = "interrupted"
            self._say("Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again stops at once)")
        elif self.reason is None:
            self.reason = "preempted"

    def reached(self, step: int) -> str | None:
        import jax
        from jax.experimental import multihost_utils

        self.training = True
        sync_point = getattr(multihost_utils, "reached_preemption_sync_point", None)
        if self.reason is None and sync_point is not None and jax.process_count() > 1 and (
                jax.devices()[0].platform == "tpu") and sync_point(step):
            self.reason = "preempted"
        self.stopped = self.reason is not None
        return self.reason

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stats(cfg: TrainConfig, record: dict) -> str:
    """Loss, token accuracy, tokens/s, MFU (where the chip's peak is known) and ETA of a record."""
    eta = (cfg.steps - record["step"]) * record["step_time_s"]
    mfu = record.get("mfu", float("nan"))
    return (f"loss {record['loss']:.4f}  acc {record.get('accuracy', float('nan')):.2%}  "
            f"{record['tokens_per_sec']:,.0f} tok/s" + (f"  MFU {mfu:.1%}" if math.isfinite(mfu) else "")
            + f"  eta {eta // 60:.0f}m{eta % 60:02.0f}s")


class Progress:
    """What `train` prints: a rich progress bar on a terminal (messages print above it), plain lines
    otherwise (CI, nohup, a log file). Only process 0 prints."""

    def __init__(self, cfg: TrainConfig, enabled: bool, interactive: bool):
        self.cfg, self.enabled, self.bar, self.task = cfg, enabled, None, None
        if enabled and interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                    TextColumn("{task.fields[stats]}"))

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(message, highlight=False, markup=False)
        else:
            print(message, flush=True)

    def record(self, record: dict) -> None:
        if "eval_loss" in record:
            self.say(f"step {record['step']:>5}  eval loss {record['eval_loss']:.4f}  "
                     f"held-out token accuracy {record.get('eval_accuracy', float('nan')):.2%}")
        elif "compile_and_first_step_s" in record:
            self.say(f"step {record['step']}: loss {record['loss']:.4f}, compiled and ran in "
                     f"{record['compile_and_first_step_s']:.1f}s")
        elif "tokens_per_sec" in record and self.bar is not None:
            if self.task is None:
                self.bar.start()
                self.task = self.bar.add_task("train", total=self.cfg.steps, stats="")
            self.bar.update(self.task, completed=record["step"], stats=_stats(self.cfg, record))
        elif "tokens_per_sec" in record:
            self.say(f"step {record['step']:>5}/{self.cfg.steps}  {_stats(self.cfg, record)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


INTERRUPTED = 128 + signal.SIGINT  # the shell's exit status for a process stopped by Ctrl-C


def train(cfg: TrainConfig) -> int:
    """`sft-sharded train`: `run.train` with its messages and progress printed by process 0; the exit status
    (130 after Ctrl-C, whose checkpoint the same command resumes from)."""
    import jax

    from sft_sharded import run
    from sft_sharded.rundir.write_echoes import quiet_failed_saves

    progress = Progress(cfg, enabled=jax.process_index() == 0, interactive=sys.stdout.isatty())
    signals = StopSignals(progress.say)
    try:
        with quiet_failed_saves():  # a failed save is one line (CheckpointNotSaved), not its writers' logs
            run.train(cfg, say=progress.say, on_record=progress.record, stop_requested=signals.reached)
    finally:
        signals.restore()
        progress.close()
    return INTERRUPTED if signals.stopped and signals.reason == "interrupted" else 0


def data(cfg: TrainConfig, n: int, json_path: str | None) -> int:
    """`sft-sharded data`: the report `train` prints, then `n` records rendered (or all of it as JSON)."""
    import json

    from sft_sharded.data import report, view
    from sft_sharded.data.pipeline import scan
    from sft_sharded.data.tokenizers import load_tokenizer
    from sft_sharded.run import tokenizer_path

    tokenizer = load_tokenizer(tokenizer_path(cfg))
    counts, items = scan(cfg.data, tokenizer, cfg.seed, keep=n)
    lines = report.build(cfg.data, counts, items).lines()
    skipped = {"too_long": f"longer than data.max_length={cfg.data.max_length}", "no_target": "no trained token"}
    records = [view.as_json(where, tokenizer, list(item.examples), item.detail or skipped.get(item.reason, ""))
               for where, item in items[:n]]
    if json_path is not None:
        text = json.dumps({"report": lines, "records": records}, ensure_ascii=False, indent=1)
        if json_path == "-":
            print(text)
        else:
            paths.path(json_path, "--json").write_text(text)
        return 0
    color = sys.stdout.isatty()
    if color:
        from rich.console import Console

        out = Console(highlight=False).print
    else:
        out = print
    for line in lines:
        out(line)
    for record in records:
        out("")
        for text in view.as_text(record, color):
            out(text)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft-sharded", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train (no arguments: the built-in task on 8 simulated devices)")
    p_train.add_argument("--config", help="YAML file of config keys")
    p_train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. steps=100 optim.lr=1e-3")
    p_data = sub.add_parser("data", help="the data report and records with their trained tokens marked, as "
                                          "`train` with the same arguments reads them")
    p_data.add_argument("--config", help="YAML file of config keys")
    p_data.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.path=chats.jsonl")
    p_data.add_argument("--records", type=int, default=3, help="how many records to show (default 3)")
    p_data.add_argument("--json", metavar="PATH", help="write the report and records as JSON ('-': stdout)")
    p_gen = sub.add_parser("generate", help="greedy answers from a trained run directory")
    p_gen.add_argument("--run-dir", required=True, help="a run directory written by `sft-sharded train`")
    p_gen.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    p_gen.add_argument("--max-new-tokens", type=int, default=64)
    p_gen.add_argument("--raw", action="store_true", help="plain text prompts, no chat template")
    p_export = sub.add_parser("export", help="write a run's weights as a Hugging Face directory")
    p_export.add_argument("--to", choices=["hf", "peft"], default="hf",
                          help="hf: a transformers model (LoRA merged in); peft: a LoRA run's adapter")
    p_export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p_export.add_argument("run_dir")
    p_export.add_argument("out_dir")
    _add_plan_arguments(sub.add_parser("plan", help="compile the train step for a TPU topology on this CPU host (AOT)"))
    return parser


def _add_plan_arguments(parser) -> None:
    """`sft-sharded plan`'s flags (`plan.train_config` turns them into a TrainConfig)."""
    parser.add_argument("--topology", required=True, help="e.g. v5p-64, v6e-256, v5p:2x2x1")
    parser.add_argument("--model", required=True, help="a preset name (sft_sharded.models.PRESETS)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--mesh", default="fsdp=-1", help="e.g. fsdp=-1, data=2,fsdp=-1,tensor=4 or fsdp=-1,context=16")
    parser.add_argument("--slices", type=int, default=1,
                        help="slices joined over DCN (the topology is one slice); --mesh's data axis spans them")
    parser.add_argument("--dcn-axis", default="data", choices=("data", "fsdp"),
                        help="the mesh axis that spans the slices (fsdp: weights gathered over DCN every layer)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (optim.grad_accum_steps)")
    parser.add_argument("--remat", default="full", choices=REMAT_POLICIES)
    parser.add_argument("--no-scan", action="store_true", help="unroll the layers (slower to compile)")
    parser.add_argument("--attention", default="auto", choices=[a for a in ATTENTION_IMPLEMENTATIONS if a != "cudnn"],
                        help="auto: splash on TPU (models/attention/)")
    parser.add_argument("--context-attention", default=DEFAULT_CONTEXT_SCHEME, choices=CONTEXT_SCHEMES,
                        help="attention over a sequence split on the mesh's context axis (models/attention/split.py)")
    parser.add_argument("--lora-rank", type=int, default=0, help="plan LoRA of this rank (and print full FT too)")
    parser.add_argument("--base-dtype", default="bfloat16", choices=LORA_BASE_DTYPES, help="storage of the LoRA base")
    parser.add_argument("--hlo-file", default=None, help="write the compiled step's optimized HLO text here")
    parser.add_argument("--loss-chunk", type=int, default=None,
                        help="chunked cross entropy with this many positions per chunk (default: 1024 for "
                             "vocabularies of 200k and more, else full logits)")


def _command(args: argparse.Namespace) -> int:
    if args.command == "plan":
        from sft_sharded import plan

        return plan.main(args)
    cpu_only_host()  # every command but `plan`, which needs libtpu's compiler
    if args.command == "data":
        return data(load_config(args.config, args.overrides), args.records, args.json)
    if args.command in ("generate", "export"):
        config_path = paths.path(args.run_dir, "run_dir") / "config.yaml"
        if not config_path.is_file():
            raise UserError(f"{args.run_dir}: not a run directory (no config.yaml)")
        cfg = load_config(config_path)
    else:
        cfg = load_config(args.config, args.overrides)
    if cfg.simulate_devices and "jax" in sys.modules:
        print(f"warning: simulate_devices={cfg.simulate_devices} ignored: jax was imported before the config was "
              "read", file=sys.stderr)
    simulate_cpu_devices(cfg.simulate_devices)
    from sft_sharded.rundir import trained
    from sft_sharded.parallel import distributed

    distributed.initialize()
    if args.command == "train":
        return train(cfg)
    if args.command == "export":
        print(f"wrote {trained.export(args.run_dir, args.out_dir, args.dtype, args.to)}")
    else:
        answers = trained.generate(args.run_dir, args.prompt, args.max_new_tokens, args.raw)
        for prompt, answer in zip(args.prompt, answers):
            print(f"{prompt} -> {answer}")
    return 0


def _describe_process() -> str:
    """"process I of N: " when jax runs many processes (a bare message does not say whose it is)."""
    if "jax" not in sys.modules:
        return ""
    import jax

    from sft_sharded.parallel import distributed

    try:
        return f"{distributed.describe()}: " if jax.process_count() > 1 else ""
    except RuntimeError:  # no backend could start: there is no process index to name
        return ""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _command(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"sft-sharded: error: {_describe_process()}{err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"sft-sharded: {_describe_process()}interrupted: stopped at once (nothing saved since the last "
              "checkpoint)", file=sys.stderr, flush=True)
        return INTERRUPTED
    except BaseException as err:
        from sft_sharded.parallel.memory import describe_xla_oom, is_xla_oom  # imports jax: only once it has started

        who = _describe_process()
        if is_xla_oom(err) and not args.debug:  # XLA's RESOURCE_EXHAUSTED: the machine, not a bug
            print(f"sft-sharded: error: {who}{describe_xla_oom(err)}", file=sys.stderr, flush=True)
            return 2
        if who and not isinstance(err, (SystemExit, KeyboardInterrupt)):
            print(f"sft-sharded: {who}failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise

if __name__ == "__main__":
    sys.exit(main())
