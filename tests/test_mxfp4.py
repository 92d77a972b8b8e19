"""gpt-oss's MXFP4 expert weights (`hf/mxfp4.py`) against transformers' own dequantization."""

import json

import jax
import numpy as np
from optional import optional

torch = optional("torch")
optional("transformers")

from test_hf import hf_logits, import_model, make_hf  # noqa: E402


def test_gpt_oss_mxfp4_experts_dequantize_as_transformers_does_shard_by_shard(tmp_path):
    """Expert weights written as MXFP4 blocks and scales (random codes, exponents around 127): the lazy view
    decodes exactly what transformers' convert_moe_packed_tensors decodes, whole or sliced, and a sharded
    import of the quantized checkpoint gives the logits of transformers' model holding those weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from sft_sharded.hf.weights import SafetensorsDir, write_safetensors
    from sft_sharded.hf.mxfp4 import Mxfp4

    model = make_hf("gpt-oss", tmp_path / "hf")
    tensors = SafetensorsDir(tmp_path / "hf")
    arrays = {name: np.array(tensors.get(name)) for name in tensors.entries}
    rng = np.random.default_rng(3)
    state = model.state_dict()
    for name in [n for n in arrays if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = arrays.pop(name).shape
        blocks = rng.integers(0, 256, (experts, outputs, inputs // 32, 16), dtype=np.uint8)
        scales = rng.integers(122, 129, (experts, outputs, inputs // 32), dtype=np.uint8)
        arrays |= {name + "_blocks": blocks, name + "_scales": scales}
        theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                            dtype=torch.float32).numpy()
        assert np.array_equal(np.asarray(Mxfp4(blocks, scales)), theirs)
        assert np.array_equal(np.asarray(Mxfp4(blocks, scales)[1:3, 33:61, ::2]), theirs[1:3, 33:61, ::2])
        state[name] = torch.from_numpy(theirs)
    model.load_state_dict(state)
    write_safetensors(tmp_path / "hf" / "model.safetensors", arrays)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    trainer, cfg, params = import_model(tmp_path / "hf", (1, 2, 2), expert=2)
    ids = np.random.default_rng(0).integers(0, 128, (2, 24))
    ours = np.asarray(jax.jit(trainer.model.apply)({"params": params}, ids.astype(np.int32)))
    assert np.abs(ours - hf_logits(model, ids)).max() <= 1e-4
