"""The train state of a run: its abstract form, a fresh one (a preset's random init or a Hugging Face
directory's weights, with fresh or imported LoRA adapters), and the frozen base put back after a restore
(checkpoints of a LoRA run hold only what training changes).
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp

from sft_sharded.rundir import paths
from sft_sharded.parallel import sharding
from sft_sharded.hf import weights as hf
from sft_sharded.config import TrainConfig
from sft_sharded.trainers import SFTTrainer, TrainState
from sft_sharded.hf.peft import load_adapters


def _dummy(cfg: TrainConfig) -> jax.Array:
    return jnp.zeros((cfg.data.batch_size, cfg.data.max_length), jnp.int32)


def abstract_state(trainer: SFTTrainer, cfg: TrainConfig) -> TrainState:
    """The train state's shapes, dtypes and shardings; no device memory is touched."""
    return trainer.abstract_train_state(jax.random.key(cfg.seed), _dummy(cfg))


def _init_part(trainer: SFTTrainer, cfg: TrainConfig, part: int, shardings):
    """The trainable (0) or frozen (1) part of the model's random init, straight into its shardings; XLA
    drops the other part's computation."""
    def init(key):
        params = trainer.model.init(key, _dummy(cfg))["params"]
        return sharding.unbox(trainer.split_params(params)[part])

    with trainer.activate():
        return jax.jit(init, out_shardings=shardings)(jax.random.key(cfg.seed))


def base_weights(trainer: SFTTrainer, cfg: TrainConfig, dtype=None):
    """The frozen part of the model's params, unquantized: read from `model.path` (in `dtype`, default
    the trainer's storage dtype), or the preset's random init again (the same seed gives the same base)."""
    abstract = trainer.abstract_base(jax.random.key(cfg.seed), _dummy(cfg))
    if dtype is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding), abstract)
    if cfg.model.path:
        return hf.load_params(cfg.model.path, trainer.model.config, abstract)
    base = _init_part(trainer, cfg, 1, sharding.shardings_of(abstract))
    return base if dtype is None else jax.tree.map(lambda x: x.astype(dtype), base)


def frozen_base(trainer: SFTTrainer, cfg: TrainConfig):
    """The frozen base as training uses it: `base_weights`, quantized if `lora.base_dtype` says so."""
    return trainer.quantize_frozen(base_weights(trainer, cfg))


def init_state(trainer: SFTTrainer, cfg: TrainConfig) -> TrainState:
    """A fresh state. A preset: random params. `model.path`: the weights come tensor by tensor from the
    safetensors (no random base on the devices); with LoRA they form the frozen base and the adapters
    are fresh (or `lora.init_from`'s); the optimizer state is built for what trains."""
    if not cfg.model.path and not cfg.lora.init_from:
        return trainer.create_train_state(jax.random.key(cfg.seed), _dummy(cfg))
    abstract = abstract_state(trainer, cfg)
    shardings = sharding.shardings_of(abstract)
    if abstract.frozen is None:
        params, frozen = hf.load_params(cfg.model.path, trainer.model.config, abstract.params), None
    else:
        frozen = frozen_base(trainer, cfg)
        if cfg.lora.init_from:
            params = load_adapters(cfg.lora.init_from, trainer.model.config, abstract.params)
        else:
            params = _init_part(trainer, cfg, 0, shardings.params)
    opt_state = jax.jit(trainer.optimizer.init, out_shardings=shardings.opt_state)(params)
    return TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), shardings.step), frozen)


def with_frozen_base(trainer: SFTTrainer, cfg: TrainConfig, state: TrainState) -> TrainState:
    """A restored state (saved without its frozen part) with the frozen base loaded again."""
    if trainer.lora is None:
        return state
    return state.replace(frozen=frozen_base(trainer, cfg))


def base_fingerprint(cfg: TrainConfig) -> str:
    """What identifies the base a run starts from: the model directory and a hash of its config.json,
    or the preset and the seed of its random init."""
    if cfg.model.path:
        config_json = paths.path(cfg.model.path, "model.path") / "config.json"
        digest = hashlib.sha256(config_json.read_bytes()).hexdigest()[:16]
        return f"{cfg.model.path} (config.json sha256 {digest})"
    return f"preset {cfg.model.preset} (seed {cfg.seed})"
