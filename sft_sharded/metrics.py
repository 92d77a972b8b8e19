"""FLOPs and MFU; run-directory metrics: metrics.jsonl, TensorBoard events, loss.png (process 0 only)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from sft_sharded.rundir import paths

# Peak dense bf16 FLOP/s per device, by jax `device_kind` prefix (vendor data sheets; TPU from the Cloud
# TPU system-architecture pages). CPUs have no meaningful peak: MFU is reported only where one is known.
PEAK_BF16_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    for prefix, flops in PEAK_BF16_FLOPS.items():
        if device_kind.startswith(prefix):
            return flops
    return None


def flops_per_token(cfg, seq: int, causal: bool = True) -> float:
    """Training FLOPs per token: 6 x matmul params (forward + backward; the embedding lookup is not a
    matmul, a tied head is) plus attention, 12 x layers x seq x (heads x head_dim), halved when causal.
    With LoRA the frozen base needs no weight gradient (4 x its matmul params) and the adapters 6 x theirs;
    with experts only the parameters a token passes through count (the router's k experts, not all).
    A linear-attention layer (Gated DeltaNet) has no [T, T] term: per token and value head, the chunked
    delta rule's within-chunk products (about 2 x chunk x (2 dk + 2 dv)) and its state reads and updates
    (6 dk dv), times 3 for training."""
    lookup = cfg.vocab_size * cfg.hidden_size if not cfg.tie_embeddings else 0
    linear = sum(map(cfg.is_linear, range(cfg.num_layers))) if hasattr(cfg, "is_linear") else 0
    attention = 12 * (cfg.num_layers - linear) * seq * cfg.num_heads * cfg.head_size
    attention = attention / 2 if causal else attention
    if linear:
        dk, dv, chunk = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_chunk
        attention += 3 * linear * cfg.linear_value_heads * (2 * chunk * (2 * dk + 2 * dv) + 6 * dk * dv)
    adapters = getattr(cfg, "num_adapter_params", lambda: 0)()
    active = cfg.num_active_params() if hasattr(cfg, "num_active_params") else cfg.num_params()
    base = (4 if adapters else 6) * (active - lookup)
    return base + 6 * adapters + attention


def memory_per_device(compiled) -> int:
    """Bytes a compiled step needs per device: arguments + outputs + temporaries - donated aliases.
    (On CPU `peak_memory_in_bytes` leaves out the temporaries, so it is not used.)"""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def mfu(tokens_per_sec: float, flops_token: float, num_devices: int, peak: float | None) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s per device over the device's peak (NaN if unknown)."""
    if not peak:
        return float("nan")
    return tokens_per_sec * flops_token / num_devices / peak


class MetricsWriter:
    """Appends to metrics.jsonl and TensorBoard events in the run directory. Buckets have no append: with
    a remote run directory the files are written in a local folder (`local_dir`) and copied up every
    `sync_every_s` seconds and at the end, so the bucket lags the run by at most that."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resumed_step: int = 0,
                 sync_every_s: float = 60.0):
        self.run_dir = paths.path(run_dir, "run_dir")
        self.remote = paths.is_remote(self.run_dir)
        self.local_dir: Path | None = None  # where the files are written (process 0 only)
        if enabled:
            self.local_dir = (Path(tempfile.mkdtemp(prefix="sft-sharded-metrics-")) if self.remote
                              else Path(self.run_dir))
        self.enabled = enabled
        self.trackers: list = []  # tracking.WandbTracker / MlflowTracker: fed every record
        self.records: list[dict] = []
        self._sync_every_s, self._synced_at = sync_every_s, time.monotonic()
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        saved = self.run_dir / "metrics.jsonl"
        if saved.exists() and resumed_step:  # keep the history up to the checkpoint; later lines are redone
            kept = [json.loads(line) for line in saved.read_text().splitlines() if line.strip()]
            self.records = [r for r in kept if r.get("step", 0) <= resumed_step]
        path = self.local_dir / "metrics.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self._jsonl = path.open("a")
        self._tb = SummaryWriter(str(self.local_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, record["step"])
        for tracker in self.trackers:
            tracker.log(record)
        if self.remote and time.monotonic() - self._synced_at >= self._sync_every_s:
            self._tb.flush()
            self._sync()

    def _sync(self) -> None:
        """Copy the local files up to the remote run directory."""
        for local in sorted(p for p in self.local_dir.rglob("*") if p.is_file()):
            target = self.run_dir / local.relative_to(self.local_dir).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(local.read_bytes())
        self._synced_at = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._tb.close()
        plot_losses(self.records, self.local_dir / "loss.png")
        for tracker in self.trackers:
            tracker.close(self.local_dir / "loss.png")
        if self.remote:
            self._sync()
            shutil.rmtree(self.local_dir)


def plot_losses(records: list[dict], path: Path) -> None:
    """Train and eval loss over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (masked mean cross entropy)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run stopped before its first step has nothing to plot
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
