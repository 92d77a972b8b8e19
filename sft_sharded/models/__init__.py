from sft_sharded.models.llama import Llama, LlamaConfig
from sft_sharded.models.presets import PRESETS, preset

__all__ = ["Llama", "LlamaConfig", "PRESETS", "preset"]
