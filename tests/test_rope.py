"""RoPE scalings against transformers' own `ROPE_INIT_FUNCTIONS` (frequencies and the cos/sin factor),
and scalings we do not implement refused by name."""

import numpy as np
import pytest
from optional import optional

from sft_sharded.models.rope import check_scaling, frequencies

transformers = optional("transformers")
optional("torch")  # transformers computes its RoPE tables with torch
rope_utils = optional("transformers.modeling_rope_utils")

SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "factor": 4.0},
    # Qwen3's long-context recipe (factor 4 over 32k), at toy sizes; then every optional knob.
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-knobs": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 48, "beta_fast": 16,
                   "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                              "attention_factor": 1.3},
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_frequencies_match_transformers(name):
    scaling = SCALINGS[name]
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=256,
                                      rope_parameters={"rope_theta": 5e5, **scaling})
    expected, expected_factor = rope_utils.ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    inv_freq, factor = frequencies(32, 5e5, check_scaling(dict(scaling)))
    np.testing.assert_allclose(np.asarray(inv_freq), expected.numpy(), rtol=1e-6)
    assert factor == pytest.approx(expected_factor, rel=1e-6)


def test_unknown_types_and_keys_are_refused_by_name():
    with pytest.raises(ValueError, match="rope scaling type 'dynamic' is not implemented"):
        check_scaling({"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match=r"missing \['factor'\], unknown \['beta'\]"):
        check_scaling({"rope_type": "linear", "beta": 1})
