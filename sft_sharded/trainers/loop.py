"""fit(): the training loop. Steps are dispatched ahead; step N-1's metrics are read while step N runs."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from sft_sharded.parallel import sharding
from sft_sharded.errors import TrainingDiverged
from sft_sharded.losses import safe_mean
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
    count = totals.get("num_tokens", 0.0)
    out = {"eval_loss": float(safe_mean(totals.get("loss_sum", 0.0), count)), "eval_num_tokens": count}
    if "num_correct" in totals:
        out["eval_accuracy"] = float(safe_mean(totals["num_correct"], count))
    return out


def evaluate_sources(trainer: Trainer, state: TrainState,
                     sources: Mapping[str, Iterable[Mapping[str, np.ndarray]]]) -> Record:
    """`evaluate` per data source (keys `eval_loss/NAME`, ...) and over all of them together, combined
    from each source's token-weighted sums (the same numbers as one pass over every batch). One source:
    plain `evaluate`."""
    if len(sources) == 1:
        return evaluate(trainer, state, next(iter(sources.values())))
    out: Record = {}
    total = {"eval_loss": 0.0, "eval_accuracy": 0.0, "eval_num_tokens": 0.0}
    for name, batches in sources.items():
        result = evaluate(trainer, state, batches)
        out.update({f"{key}/{name}": value for key, value in result.items()})
        count = result["eval_num_tokens"]
        total["eval_num_tokens"] += count
        for key in ("eval_loss", "eval_accuracy"):
            total[key] += result.get(key, 0.0) * count
    for key in ("eval_loss", "eval_accuracy"):
        total[key] = float(safe_mean(total[key], total["eval_num_tokens"]))
    if not any(key.startswith("eval_accuracy/") for key in out):
        total.pop("eval_accuracy")
    return {**total, **out}


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

    def record(self, step: int, last: Mapping[str, Any], timed: bool = True) -> Record:
        """Loss and accuracy over the window (the step's own loss, 0, for a window with no target: the
        masked mean of nothing, as the step computes it); throughput only when `timed`."""
        count = self.sums.get("num_tokens", 0.0)
        record = {"step": step, "loss": self.sums["loss_sum"] / count if count else 0.0, "num_tokens": count,
                  "grad_norm": float(last["grad_norm"])}
        if timed:
            elapsed = time.perf_counter() - self.t0
            record["tokens_per_sec"] = self.tokens / elapsed
            record["real_tokens_per_sec"] = self.sums.get("num_real_tokens", self.tokens) / elapsed
            record["step_time_s"] = elapsed / max(self.steps, 1)
        if "num_correct" in self.sums and count:
            record["accuracy"] = self.sums["num_correct"] / count
        # A mixture's router metrics (aux and z losses, expert load, dropped pairs): the last step's.
        record.update({k: float(v) for k, v in last.items() if k.startswith("moe_")})
        return record


def _check_step(step: int, metrics: Mapping[str, Any]) -> None:
    """Stop on a non-finite loss or gradient (the state after this step is not worth keeping); warn on a
    batch with no trained target (loss 0, zero gradients; the optimizer's momentum still moves)."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(step, f"the loss is {loss} and the gradient norm {grad_norm}")
    if float(metrics["num_tokens"]) == 0:
        warnings.warn(f"step {step}: the batch has no trained target (every label masked); its loss is 0 and "
                      "its gradients are zero", stacklevel=3)


class _Recorder:
    """Reads each step's metrics back (step N-1's while step N runs), checks them and turns them into
    records: the compile step on its own, then one record per `log_every` steps."""

    def __init__(self, trainer: Trainer, steps: int, log_every: int, flops_per_token: float | None,
                 on_record: Callable[[Record], None]):
        self.trainer, self.steps, self.log_every = trainer, steps, log_every
        self.flops_per_token, self.on_record = flops_per_token, on_record
        self.records: list[Record] = []
        self.pending = None  # (step, metrics on device, tokens in the batch)
        self.window: _Window | None = None  # starts once the first (compiling) step is back
        self.t_start = time.perf_counter()

    def emit(self, record: Record) -> None:
        self.records.append(record)
        self.on_record(record)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics, tokens = self.pending
        self.pending = None
        metrics = jax.device_get(metrics)
        _check_step(step, metrics)
        if self.window is None:  # the first step carries the compile time; throughput starts after it
            first = _Window()
            first.add(metrics, tokens)
            self.emit({**first.record(step, metrics, timed=False),
                       "compile_and_first_step_s": time.perf_counter() - self.t_start})
            self.window = _Window()
            return
        self.window.add(metrics, tokens)
        if step % self.log_every == 0 or step == self.steps:
            record = self.window.record(step, metrics)
            if self.flops_per_token:
                self._add_mfu(record)
            self.emit(record)
            self.window = _Window()

    def _add_mfu(self, record: Record) -> None:
        devices = self.trainer.mesh.devices.size
        peak = peak_flops(self.trainer.mesh.devices.flat[0].device_kind)
        record["model_tflops_per_sec_per_device"] = record["tokens_per_sec"] * self.flops_per_token / devices / 1e12
        if peak is None:  # a CPU, or a chip whose peak is not in metrics.PEAK_BF16_FLOPS: no MFU, not NaN
            return
        record["mfu"] = mfu(record["tokens_per_sec"], self.flops_per_token, devices, peak)  # all positions
        record["mfu_real_tokens"] = mfu(record["real_tokens_per_sec"], self.flops_per_token, devices, peak)

    def evaluate(self, step: int, eval_fn: Callable[[TrainState], Record], state: TrainState) -> None:
        self.flush()
        t_eval = time.perf_counter()
        self.emit({"step": step, **eval_fn(state)})
        if self.window is not None:
            self.window.t0 += time.perf_counter() - t_eval  # eval time is not training throughput


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
    save_due: Callable[[int], bool] = lambda step: False,
    flops_per_token: float | None = None,
    before_first_step: Callable[[TrainState, Mapping[str, Any]], None] = lambda state, batch: None,
) -> tuple[TrainState, list[Record]]:
    """Train from `state.step` to `steps`. `batches` yields this process's rows of each global batch.

    `after_step(step, state)` runs once each step is dispatched (checkpoints); True stops the loop there.
    On steps where `save_due(step)` is true the step's metrics are read first, so a state whose loss or
    gradient is not finite never reaches `after_step`. A non-finite loss raises `TrainingDiverged`.
    `before_first_step(state, batch)` sees the first global batch before the step runs (a memory check).
    """
    recorder = _Recorder(trainer, steps, log_every, flops_per_token, on_record)
    first = int(state.step) + 1
    for step in range(first, steps + 1):
        local = next(batches)
        tokens = int(np.size(local["input_ids"])) * jax.process_count()
        batch = sharding.global_batch(local, trainer.mesh)
        if step == first:
            before_first_step(state, batch)
        state, metrics = trainer.train_step(state, batch)
        recorder.flush()  # step N-1's scalars, while step N runs
        recorder.pending = (step, metrics, tokens)
        if save_due(step):
            recorder.flush()
        if after_step(step, state):
            recorder.flush()
            return state, recorder.records
        if eval_fn is not None and eval_every and step % eval_every == 0 and step != steps:
            recorder.evaluate(step, eval_fn, state)
    recorder.flush()
    if eval_fn is not None:
        recorder.evaluate(steps, eval_fn, state)
    return state, recorder.records
