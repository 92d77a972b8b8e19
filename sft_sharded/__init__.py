"""sft_sharded: supervised fine-tuning of decoder LLMs on many accelerators with JAX.

Re-exports load lazily, so `import sft_sharded.cli` does not import jax before the CLI has set up
simulated devices from the config.
"""

import importlib

_EXPORTS = {
    "SFTTrainer": "sft_sharded.trainers",
    "Trainer": "sft_sharded.trainers",
    "TrainState": "sft_sharded.trainers",
    "make_mesh": "sft_sharded.parallel.sharding",
    "LOGICAL_AXIS_RULES": "sft_sharded.parallel.sharding",
    "Decoder": "sft_sharded.models",
    "DecoderConfig": "sft_sharded.models",
    "Llama": "sft_sharded.models",
    "LlamaConfig": "sft_sharded.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sft_sharded' has no attribute {name!r}")
