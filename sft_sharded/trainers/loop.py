"""fit(): the training loop. Steps are dispatched ahead; step N-1's metrics are read while step N runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from sft_sharded import sharding
from sft_sharded.metrics import mfu, peak_flops
from sft_sharded.trainers.trainer import Trainer, TrainState

Record = dict[str, Any]


def evaluate(trainer: Trainer, state: TrainState, batches: Iterable[Mapping[str, np.ndarray]]) -> Record:
    """Held-out loss and token accuracy: sums over every batch, divided once on the host."""
    totals: dict[str, float] = {}
    for batch in batches:
        metrics = jax.device_get(trainer.eval_step(state, sharding.global_batch(batch, trainer.mesh)))
        for key in ("loss_sum", "num_tokens", "num_correct"):
            if key in metrics:
                totals[key] = totals.get(key, 0.0) + float(metrics[key])
    count = max(totals.get("num_tokens", 0.0), 1.0)
    out = {"eval_loss": totals.get("loss_sum", 0.0) / count, "eval_num_tokens": totals.get("num_tokens", 0.0)}
    if "num_correct" in totals:
        out["eval_accuracy"] = totals["num_correct"] / count
    return out


class _Window:
    """Sums of the steps since the last log line; the host divides."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: Mapping[str, Any], tokens: int) -> None:
        for key in ("loss_sum", "num_tokens", "num_correct", "num_real_tokens"):
            if key in metrics:
                self.sums[key] = self.sums.get(key, 0.0) + float(metrics[key])
        self.steps += 1
        self.tokens += tokens

    def record(self, step: int, last: Mapping[str, Any]) -> Record:
        elapsed = time.perf_counter() - self.t0
        count = self.sums.get("num_tokens", 0.0)
        record = {
            "step": step,
            # An all-masked window has no loss to report: NaN says so, a 0.0 would claim a perfect fit.
            "loss": self.sums["loss_sum"] / count if count else float("nan"),
            "num_tokens": count,
            "grad_norm": float(last["grad_norm"]),
            "tokens_per_sec": self.tokens / elapsed if elapsed > 0 else float("nan"),
            "real_tokens_per_sec": self.sums.get("num_real_tokens", self.tokens) / elapsed if elapsed > 0 else float("nan"),
            "step_time_s": elapsed / max(self.steps, 1),
        }
        if "num_correct" in self.sums and count:
            record["accuracy"] = self.sums["num_correct"] / count
        return record


def fit(
    trainer: Trainer,
    state: TrainState,
    batches: Iterator[Mapping[str, np.ndarray]],
    *,
    steps: int,
    log_every: int = 10,
    eval_every: int = 0,
    eval_fn: Callable[[TrainState], Record] | None = None,
    on_record: Callable[[Record], None] = lambda record: None,
    after_step: Callable[[int, TrainState], bool] = lambda step, state: False,
    flops_per_token: float | None = None,
) -> tuple[TrainState, list[Record]]:
    """Train from `state.step` to `steps`. `batches` yields this process's rows of each global batch.

    `after_step(step, state)` runs once each step is dispatched (checkpoints); True stops the loop there.
    """
    records: list[Record] = []
    pending = None  # (step, metrics on device, tokens in the batch)
    window = None  # starts once the first (compiling) step is back

    def drain(item) -> None:
        nonlocal window
        step, metrics, tokens = item
        metrics = jax.device_get(metrics)
        if window is None:  # the first step carries the compile time; throughput starts after it
            first = _Window()
            first.add(metrics, tokens)
            record = first.record(step, metrics)
            del record["tokens_per_sec"], record["step_time_s"]
            record["compile_and_first_step_s"] = time.perf_counter() - t_start
            records.append(record)
            on_record(record)
            window = _Window()
            return
        window.add(metrics, tokens)
        if step % log_every == 0 or step == steps:
            record = window.record(step, metrics)
            if flops_per_token:
                devices = trainer.mesh.devices.size
                peak = peak_flops(trainer.mesh.devices.flat[0].device_kind)
                per_device = record["tokens_per_sec"] * flops_per_token / devices
                record["model_tflops_per_sec_per_device"] = per_device / 1e12
                record["mfu"] = mfu(record["tokens_per_sec"], flops_per_token, devices, peak)  # all positions
                record["mfu_real_tokens"] = mfu(record["real_tokens_per_sec"], flops_per_token, devices, peak)
            records.append(record)
            on_record(record)
            window = _Window()

    t_start = time.perf_counter()
    for step in range(int(state.step) + 1, steps + 1):
        local = next(batches)
        tokens = int(np.size(local["input_ids"])) * jax.process_count()
        state, metrics = trainer.train_step(state, sharding.global_batch(local, trainer.mesh))
        if pending is not None:
            drain(pending)  # step N-1's scalars, while step N runs
        pending = (step, metrics, tokens)
        if after_step(step, state):
            drain(pending)
            return state, records
        if eval_fn is not None and eval_every and step % eval_every == 0 and step != steps:
            drain(pending)
            pending = None
            t_eval = time.perf_counter()
            record = {"step": step, **eval_fn(state)}
            records.append(record)
            on_record(record)
            if window is not None:
                window.t0 += time.perf_counter() - t_eval  # eval time is not training throughput
    if pending is not None:
        drain(pending)
    if eval_fn is not None:
        record = {"step": steps, **eval_fn(state)}
        records.append(record)
        on_record(record)
    return state, records
