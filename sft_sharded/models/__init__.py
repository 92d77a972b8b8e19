from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.decoder import Decoder
from sft_sharded.models.presets import PRESETS, preset

# The names of the first release, when the decoder was Llama's alone; kept so that user code keeps working.
Llama, LlamaConfig = Decoder, DecoderConfig

__all__ = ["Decoder", "DecoderConfig", "Llama", "LlamaConfig", "PRESETS", "preset"]
