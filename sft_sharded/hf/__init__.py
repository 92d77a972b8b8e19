"""Hugging Face interop: `config.json` <-> DecoderConfig (`config`), which checkpoint tensor fills which
parameter (`tensor_map`), safetensors import/export (`weights`), MXFP4 experts (`mxfp4`) and PEFT adapters
(`peft`). Each family's facts live in `sft_sharded/families/`; these modules loop over them."""
