"""A Gated DeltaNet layer (models/gated_deltanet.py) against transformers' Qwen3_5GatedDeltaNet with the
same random weights: grouped heads (2 q/k heads for 4 value heads), widths 8 and 6, a 4-wide convolution,
a row longer than one 64-token chunk, and a packed row against its segments run separately."""

import jax
import numpy as np
import pytest
from optional import optional

from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.gated_deltanet import GatedDeltaNet

D, HK, HV, DK, DV, WIDTH = 32, 2, 4, 8, 6, 4


def layers():
    transformers = optional("transformers")
    torch = optional("torch")
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    config = transformers.Qwen3_5TextConfig(
        hidden_size=D, linear_num_key_heads=HK, linear_num_value_heads=HV, linear_key_head_dim=DK,
        linear_value_head_dim=DV, linear_conv_kernel_dim=WIDTH, rms_norm_eps=1e-6, num_hidden_layers=1,
        layer_types=["linear_attention"])
    torch.manual_seed(0)
    theirs = Qwen3_5GatedDeltaNet(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if name in ("A_log", "dt_bias", "norm.weight") else 0.2))
    w = {name: p.detach().numpy() for name, p in theirs.named_parameters()}
    kd, conv = HK * DK, w["conv1d.weight"][:, 0]
    qkv = w["in_proj_qkv.weight"]
    params = {
        "wq": qkv[:kd].T.reshape(D, HK, DK), "wk": qkv[kd:2 * kd].T.reshape(D, HK, DK),
        "wv": qkv[2 * kd:].T.reshape(D, HV, DV), "conv_q": conv[:kd].reshape(HK, DK, WIDTH),
        "conv_k": conv[kd:2 * kd].reshape(HK, DK, WIDTH), "conv_v": conv[2 * kd:].reshape(HV, DV, WIDTH),
        "wz": w["in_proj_z.weight"].T.reshape(D, HV, DV), "w_b": w["in_proj_b.weight"].T,
        "w_a": w["in_proj_a.weight"].T, "a_log": w["A_log"], "dt_bias": w["dt_bias"], "norm": w["norm.weight"],
        "wo": w["out_proj.weight"].T.reshape(HV, DV, D),
    }
    cfg = DecoderConfig(vocab_size=16, hidden_size=D, num_layers=1, num_heads=4, num_kv_heads=4, mlp_dim=16,
                        rms_norm_eps=1e-6, linear_key_heads=HK, linear_value_heads=HV, linear_key_dim=DK,
                        linear_value_dim=DV, linear_conv_width=WIDTH)
    return theirs, GatedDeltaNet(cfg), {"params": params}


def test_outputs_equal_transformers_and_a_packed_row_its_segments():
    theirs, ours, variables = layers()
    import torch

    x = np.random.default_rng(0).normal(size=(2, 70, D)).astype(np.float32)
    with torch.no_grad():
        want = theirs(torch.tensor(x)).numpy()
    got, _ = jax.jit(ours.apply)(variables, x)
    np.testing.assert_allclose(got, want, atol=1e-4)
    segments = np.array([[1] * 30 + [2] * 35 + [0] * 5] * 2, np.int32)
    packed, _ = jax.jit(ours.apply)(variables, x, segments)
    for start, stop in ((0, 30), (30, 65)):
        with torch.no_grad():
            alone = theirs(torch.tensor(x[:, start:stop])).numpy()
        np.testing.assert_allclose(packed[:, start:stop], alone, atol=1e-4)


def test_a_sequence_split_over_the_context_axis_is_refused_by_name():
    """The delta rule's state would have to pass from one sequence shard to the next: not implemented, so a
    mesh with context > 1 stops with the setting to change, before anything runs."""
    import jax.numpy as jnp
    import optax

    from sft_sharded import Decoder, SFTTrainer, make_mesh
    from sft_sharded.errors import UserError

    cfg = DecoderConfig(vocab_size=16, hidden_size=D, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=16,
                        layer_types=("linear_attention", "full_attention"), linear_key_heads=HK, linear_value_heads=HV,
                        linear_key_dim=DK, linear_value_dim=DV)
    trainer = SFTTrainer(Decoder(cfg), optax.sgd(0.1), mesh=make_mesh(fsdp=1, context=2, devices=jax.devices()[:2]))
    with pytest.raises(UserError, match=r"Gated DeltaNet.*set mesh.context=1"):
        trainer.abstract_train_state(jax.random.key(0), jnp.zeros((2, 16), jnp.int32))
