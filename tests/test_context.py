"""Context parallelism: a row's positions split over the mesh's `context` axis (models/attention/split.py).

References are independent of the split: the plain-einsum attention (`dot_product_attention`) and the same
model on one device."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sft_sharded.errors import UserError
from sft_sharded.generate import greedy_generate
from sft_sharded.models.attention import choose, split as context
from sft_sharded.models.attention.choose import Split, choose_kernel
from sft_sharded.models.attention.layout import layout_order
from sft_sharded.models.attention import dot_product_attention
from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.decoder import Decoder
from sft_sharded.parallel.sharding import LOGICAL_AXIS_RULES, make_mesh
from sft_sharded.trainers.sft_trainer import SFTTrainer

B, T = 4, 64


def _packed_segments():
    """Segments that cross every shard boundary of 2, 4 and 8 shards, and a padded tail."""
    seg = np.ones((B, T), np.int32)
    seg[0, 13:], seg[0, 40:] = 2, 3
    seg[1, 50:] = 0
    seg[2, 31:] = 2
    return seg


def _assert_equal_to_reference(split, mesh, qkv, seg, d_out, window, cap, atol):
    """`split` (attention on the mesh) equals the plain-einsum attention: output, and the value and
    gradients of sum(out * d_out)."""
    def reference(q, k, v):
        return dot_product_attention(q, k, v, seg, window=window, softcap=cap)

    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * d_out), argnums=(0, 1, 2)))(*qkv)

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out, (value, grads) = jax.jit(split)(*qkv), value_and_grads(split)
    np.testing.assert_allclose(out, reference(*qkv), atol=atol / 5)
    ref_value, ref_grads = value_and_grads(reference)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for ours, theirs in zip(grads, ref_grads):
        np.testing.assert_allclose(ours, theirs, atol=atol)


@pytest.mark.parametrize("kernel, layout, shards, tensor, window, cap, length", [
    ("splash", "zigzag", 2, 2, None, 4.0, 512),  # chunks 0 and 3 on one device, 1 and 2 on the other
    ("splash", "contiguous", 4, 1, 100, None, 512),  # window < a shard's 128 positions
    ("cudnn", "zigzag", 4, 2, 7, None, 64),  # window < a chunk's 8 positions, odd: the key slice starts early
    ("cudnn", "contiguous", 2, 1, None, None, 64),
])
def test_fused_per_shard_kernels_match_the_reference_forward_and_backward(monkeypatch, kernel, layout, shards,
                                                                          tensor, window, cap, length):
    """Splash (Pallas interpret mode here) and cuDNN (jax's XLA implementation of the same call here) as the
    kernel of the all-gather scheme: each device's query chunks against the gathered keys, with segments
    crossing every shard boundary. Which kernel runs where is `choose_kernel`'s (tested below)."""
    monkeypatch.setattr(context, "choose_kernel", lambda *args, **kwargs: kernel)
    rng = np.random.default_rng(1)
    q, d_out = (jnp.asarray(rng.normal(size=(2, length, 4, 8)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 8)), jnp.float32) for _ in range(2))
    seg = np.ones((2, length), np.int32)
    cut = length / 512  # the segments' boundaries scale with the length
    seg[0, int(100 * cut):], seg[0, int(300 * cut):], seg[1, int(200 * cut):], seg[1, int(460 * cut):] = 2, 3, 2, 0
    seg = jnp.asarray(seg)
    order = layout_order(length, shards, layout)
    perm = np.arange(length) if order is None else order
    mesh = make_mesh(data=1, fsdp=8 // shards // tensor, tensor=tensor, context=shards)

    def split(q, k, v):
        out = context.attention(q[:, perm], k[:, perm], v[:, perm], seg[:, perm], window, 8 ** -0.5, cap,
                                "allgather", layout)
        return out[:, np.argsort(perm)]

    _assert_equal_to_reference(split, mesh, (q, k, v), seg, d_out, window, cap, atol=2e-5)


def test_per_shard_kernel_picks_the_fused_kernel_where_it_runs_and_refuses_by_name(monkeypatch):
    assert choose_kernel("auto", jnp.bfloat16, 64, 1024, split=Split("allgather", 4, "zigzag")) == "jax"  # on CPU
    assert choose_kernel("splash", jnp.float32, 64, 1024, split=Split("allgather", 4, "zigzag")) == "splash"
    with pytest.raises(ValueError, match=r"needs model.context_attention=allgather \(got 'ring'\)"):
        choose_kernel("splash", jnp.float32, 64, 1024, split=Split("ring", 4, "zigzag"))
    with pytest.raises(ValueError, match=r"chunks of a multiple of 128 positions \(got 64: 512 positions, 4 shards"):
        choose_kernel("splash", jnp.float32, 64, 512, split=Split("allgather", 4, "zigzag"))
    with pytest.raises(ValueError, match=r"attention='cudnn' needs a GPU"):
        choose_kernel("cudnn", jnp.bfloat16, 64, 1024, split=Split("allgather", 4, "zigzag"))
    monkeypatch.setattr(choose, "current_platform", lambda: "gpu")  # what the rule says on a GPU
    assert choose_kernel("auto", jnp.bfloat16, 64, 1024, split=Split("allgather", 4, "zigzag")) == "cudnn"
    assert choose_kernel("auto", jnp.bfloat16, 64, 1024, split=Split("ring", 4, "zigzag")) == "jax"
    assert choose_kernel("auto", jnp.bfloat16, 64, 1024, softcap=30.0, split=Split("allgather", 4, "zigzag")) == "jax"
    assert choose_kernel("auto", jnp.float32, 64, 1024, split=Split("allgather", 4, "zigzag")) == "jax"
    with pytest.raises(ValueError, match=r"attention='cudnn' .* needs model.context_attention=allgather"):
        choose_kernel("cudnn", jnp.bfloat16, 64, 1024, split=Split("ring", 4, "zigzag"))
    with pytest.raises(ValueError, match=r"multiple of 2 positions \(got 3: 24 positions, 4 shards, zigzag"):
        choose_kernel("cudnn", jnp.bfloat16, 64, 24, split=Split("allgather", 4, "zigzag"))


def test_zigzag_layout_gives_each_shard_a_chunk_from_each_end():
    order = layout_order(16, 4)
    np.testing.assert_array_equal(order.reshape(4, 4), [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11],
                                                        [6, 7, 8, 9]])
    assert layout_order(16, 1) is None and layout_order(16, 4, "contiguous") is None
    assert layout_order(12, 4) is None  # no 8 equal chunks: the natural order (still correct)


@pytest.mark.parametrize("scheme, layout, shards, tensor, window, cap", [
    ("allgather", "zigzag", 8, 1, None, 5.0),
    ("ring", "zigzag", 4, 2, 6, None),  # window smaller than a shard's 16 positions
    ("ring", "contiguous", 8, 1, None, None),
    ("allgather", "contiguous", 2, 2, 10, 3.0),
])
def test_split_sequence_attention_matches_the_reference_forward_and_backward(scheme, layout, shards, tensor, window,
                                                                             cap):
    rng = np.random.default_rng(0)
    q, d_out = (jnp.asarray(rng.normal(size=(2, T, 4, 8)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(2, T, 2, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(_packed_segments()[:2])
    order = layout_order(T, shards, layout)
    perm = np.arange(T) if order is None else order
    mesh = make_mesh(data=1, fsdp=8 // shards // tensor, tensor=tensor, context=shards)

    def split(q, k, v):  # in the layout order and back
        out = context.attention(q[:, perm], k[:, perm], v[:, perm], seg[:, perm], window, 8 ** -0.5, cap, scheme,
                                layout)
        return out[:, np.argsort(perm)]

    _assert_equal_to_reference(split, mesh, (q, k, v), seg, d_out, window, cap, atol=1e-5)


TINY_MIXED = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                           init_std=0.2, sliding_window=5, layer_types=("sliding_attention", "full_attention"),
                           scan_layers=True, remat="full")
TINY_MOE = dataclasses.replace(TINY_MIXED, sliding_window=None, layer_types=None, num_experts=4, experts_per_token=2,
                               moe_mlp_dim=16, router_aux_loss_coef=0.1)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    seg = _packed_segments()
    starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    pos = np.zeros((B, T), np.int32)
    for t in range(1, T):  # RoPE positions restart in every packed segment
        pos[:, t] = np.where(starts[:, t], 0, pos[:, t - 1] + 1)
    return {"input_ids": rng.integers(0, 64, (B, T)).astype(np.int32),
            "labels": np.where(seg > 0, rng.integers(1, 64, (B, T)), 0).astype(np.int32),
            "segment_ids": seg, "positions": pos}


@functools.lru_cache(maxsize=None)  # the one-device reference of a config is computed once
def _one_device(cfg):
    return _loss_and_grads(cfg, make_mesh(data=1, fsdp=1, devices=jax.devices()[:1]), extra=bool(cfg.num_experts))


def _loss_and_grads(cfg, mesh, accum=1, chunk=None, extra=False):
    trainer = SFTTrainer(Decoder(cfg), optax.sgd(0.1), mesh=mesh, grad_accum_steps=accum, loss_chunk_size=chunk)
    params = trainer.create_train_state(jax.random.key(0), jnp.zeros((B, T), jnp.int32)).params
    loss, grads = trainer.loss_and_grad(params, _batch())
    with trainer.activate():
        penalty = jax.jit(trainer.loss_terms)(params, _batch())[0].penalty if extra else 0.0
    return float(loss), float(penalty), jax.tree.map(np.asarray, grads)


# (model, mesh sizes, grad accumulation, loss chunk): every context size, with fsdp, tensor, experts, both
# schemes (the default, ring, and allgather).
CASES = [
    (TINY_MIXED, dict(context=8, fsdp=1), 1, None),
    (TINY_MIXED, dict(context=4, fsdp=1, tensor=2), 1, None),
    (TINY_MIXED, dict(context=2, fsdp=2, tensor=2), 2, 16),
    (dataclasses.replace(TINY_MIXED, context_attention="allgather"), dict(context=4, fsdp=2), 1, None),
    (TINY_MOE, dict(context=4, fsdp=1, expert=2), 2, None),
]


@pytest.mark.parametrize("cfg, sizes, accum, chunk", CASES)
def test_loss_and_grads_with_a_split_sequence_equal_one_device(cfg, sizes, accum, chunk):
    one = _one_device(dataclasses.replace(cfg, context_attention="ring"))  # the scheme is unused on one device
    split = _loss_and_grads(cfg, make_mesh(data=1, **sizes), accum, chunk, extra=bool(cfg.num_experts))
    np.testing.assert_allclose(split[:2], one[:2], rtol=2e-6)
    assert not cfg.num_experts or one[1] > 0  # the router's loss is in the comparison
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-7), split[2], one[2])


def test_splash_per_shard_kernel_in_the_model_equals_one_device():
    """The decoder (scanned, rematerialized, mixed sliding and full layers) with splash under all-gather on
    context=2 x tensor=2 equals one device running the XLA kernel."""
    length = 512
    cfg = dataclasses.replace(TINY_MIXED, sliding_window=200, context_attention="allgather")
    rng = np.random.default_rng(2)
    seg = np.ones((2, length), np.int32)
    seg[0, 150:], seg[1, 300:] = 2, 0
    pos = np.concatenate([np.arange(150), np.arange(length - 150)])[None].repeat(2, 0).astype(np.int32)
    pos[1] = np.arange(length)
    batch = {"input_ids": rng.integers(0, 64, (2, length)).astype(np.int32), "segment_ids": seg, "positions": pos,
             "labels": np.where(seg > 0, rng.integers(1, 64, (2, length)), 0).astype(np.int32)}
    results = []
    for attention, mesh in (("xla", make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])),
                            ("splash", make_mesh(data=1, fsdp=2, tensor=2, context=2))):
        trainer = SFTTrainer(Decoder(dataclasses.replace(cfg, attention=attention)), optax.sgd(0.1), mesh=mesh)
        params = trainer.create_train_state(jax.random.key(0), jnp.zeros((2, length), jnp.int32)).params
        loss, grads = trainer.loss_and_grad(params, batch)
        results.append((float(loss), jax.tree.map(np.asarray, grads)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-7), results[1][1], results[0][1])


def test_generation_on_a_split_sequence_mesh_matches_one_device():
    prompts = [[5, 9, 3, 7], [1, 2], [8, 8, 8, 8, 8, 8], [4]]
    outs = []
    for mesh in (make_mesh(data=1, fsdp=1, devices=jax.devices()[:1]), make_mesh(data=1, fsdp=2, context=4)):
        trainer = SFTTrainer(Decoder(TINY_MIXED), optax.sgd(0.1), mesh=mesh)
        params = trainer.create_train_state(jax.random.key(0), jnp.zeros((B, T), jnp.int32)).params
        outs.append(greedy_generate(trainer, params, prompts, max_new_tokens=6))
    assert outs[0] == outs[1]


def test_a_length_the_context_axis_does_not_divide_is_refused_with_both_sizes():
    trainer = SFTTrainer(Decoder(TINY_MIXED), optax.sgd(0.1), mesh=make_mesh(data=1, fsdp=2, context=4))
    params = trainer.create_train_state(jax.random.key(0), jnp.zeros((B, T), jnp.int32)).params
    batch = {key: value[:, :30] for key, value in _batch().items()}
    with pytest.raises(UserError, match=r"sequence length 30 .* mesh.context = 4"):
        trainer.loss_and_grad(params, batch)
