"""make_optimizer(OptimConfig, total_steps) -> optax: clip, AdamW, warmup then cosine/linear decay."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import optax

from sft_sharded.config import OptimConfig
from sft_sharded.parallel.sharding import key_name

_NO_DECAY_NAMES = ("bias", "scale", "norm")


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: not on norm scales or biases (matched by parameter path name,
    because with scan-over-layers a norm scale is 2-D and a rank rule would decay it)."""
    def decays(path, _):
        names = [key_name(entry).lower() for entry in path]
        return not any(marker in name for name in names for marker in _NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then decay to lr * end_lr_ratio at `total_steps` (optimizer updates)."""
    end = cfg.lr * cfg.end_lr_ratio
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer for `total_steps` updates; warns when its schedule makes every update zero."""
    schedule = make_schedule(cfg, total_steps)
    # Warmup starts at lr 0 on the first update (as in transformers); the first non-zero rate comes
    # within warmup + 1 updates, so those are the ones to look at.
    if all(float(schedule(i)) == 0.0 for i in range(min(total_steps, cfg.warmup_steps + 1))):
        warnings.warn(f"optim.warmup_steps={cfg.warmup_steps} with {total_steps} step(s): every update has learning "
                      "rate 0 (warmup starts at 0 on the first update), so this run trains nothing; use more "
                      "steps or optim.warmup_steps=0", stacklevel=2)
    tx = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask,
    )
    if cfg.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
