"""Llama forward against a float64 numpy implementation; remat and scan-over-layers change nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from reference import GRAD_TOL, llama_logits

from sft_sharded import Decoder, DecoderConfig, SFTTrainer, make_mesh
from sft_sharded.models import preset
from sft_sharded.parallel.sharding import unbox


def _init(cfg, ids):
    return unbox(Decoder(cfg).init(jax.random.key(1), ids)["params"])


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": True}, {"qkv_bias": True, "rope_theta": 1e6}, {"num_kv_heads": 1}, {"num_kv_heads": 4}],
    ids=["gqa", "tied", "qwen2-bias", "mqa", "mha"],
)
def test_logits_match_numpy_reference(tiny_config, overrides):
    cfg = dataclasses.replace(tiny_config, **overrides)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    params = _init(cfg, ids)
    if cfg.qkv_bias:  # biases start at zero; make them matter
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.3 if "bias" in jax.tree_util.keystr(path) else x, params
        )
    logits = jax.jit(Decoder(cfg).apply)({"params": params}, ids)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 12, cfg.vocab_size)
    np.testing.assert_allclose(logits, llama_logits(params, cfg, ids), atol=2e-5, rtol=1e-4)


def test_segment_ids_and_positions_match_numpy_reference(tiny_config):
    ids = np.random.default_rng(1).integers(0, 64, (2, 10)).astype(np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0], [1] * 10], np.int32)
    positions = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 0, 0], list(range(10))], np.int32)
    params = _init(tiny_config, ids)
    logits = jax.jit(Decoder(tiny_config).apply)({"params": params}, ids, positions=positions, segment_ids=segments)
    expected = llama_logits(params, tiny_config, ids, positions, segments)
    np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-4)


def _stack_layers(params, num_layers):
    layers = [params.pop(f"layer_{i}") for i in range(num_layers)]
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def _loss(cfg, params, ids):
    return jnp.mean(Decoder(cfg).apply({"params": params}, ids) ** 2)


def _assert_variant_matches(base_cfg, cfg, ids):
    """`cfg` (remat, scan, attention...) gives `base_cfg`'s loss and gradients on the same weights (stacked
    when `cfg` scans); returns the baseline's params and loss."""
    params = _init(base_cfg, ids)
    variant = _stack_layers(dict(params), cfg.num_layers) if cfg.scan_layers else params
    assert jax.tree.structure(variant) == jax.tree.structure(_init(cfg, ids))
    base_loss, base_grads = jax.jit(jax.value_and_grad(lambda p: _loss(base_cfg, p, ids)))(params)
    loss_v, grads_v = jax.jit(jax.value_and_grad(lambda p: _loss(cfg, p, ids)))(variant)
    np.testing.assert_allclose(loss_v, base_loss, rtol=1e-6)
    if cfg.scan_layers:
        base_grads = _stack_layers(dict(base_grads), cfg.num_layers)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **GRAD_TOL), grads_v, base_grads)
    return params, base_loss


@pytest.mark.parametrize("remat", ["none", "full", "save_dots"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_and_scan_give_the_same_loss_and_grads(tiny_config, remat, scan):
    ids = np.random.default_rng(2).integers(0, 64, (2, 12)).astype(np.int32)
    _assert_variant_matches(tiny_config, dataclasses.replace(tiny_config, remat=remat, scan_layers=scan), ids)


def test_scanned_params_are_sharded_with_a_replicated_layers_axis(tiny_config):
    cfg = dataclasses.replace(tiny_config, scan_layers=True, remat="full")
    trainer = SFTTrainer(Decoder(cfg), optax.adam(1e-3), mesh=make_mesh(2, 2, 2))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    wq = state.params["layers"]["attn"]["wq"]
    assert wq.shape == (2, 32, 4, 8) and wq.sharding.spec == P(None, ("fsdp", "context"), "tensor", None)
    assert state.params["layers"]["attn_norm"]["scale"].sharding.spec == P(None, None)


def test_bfloat16_compute_runs_and_stays_close(tiny_config):
    ids = np.random.default_rng(3).integers(0, 64, (2, 12)).astype(np.int32)
    params = _init(tiny_config, ids)
    full = jax.jit(Decoder(tiny_config).apply)({"params": params}, ids)
    half = jax.jit(Decoder(dataclasses.replace(tiny_config, dtype="bfloat16")).apply)({"params": params}, ids)
    assert half.dtype == jnp.float32  # logits leave the model in float32 for the loss
    assert np.abs(np.asarray(half) - np.asarray(full)).max() < 0.1 * np.abs(np.asarray(full)).max()


def test_param_count_matches_the_initialised_tree(tiny_config):
    for cfg in (tiny_config, dataclasses.replace(tiny_config, tie_embeddings=True, qkv_bias=True)):
        params = jax.eval_shape(lambda: _init(cfg, jnp.zeros((1, 4), jnp.int32)))
        assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    assert 1.2e9 < preset("llama3.2-1b").num_params() < 1.3e9
    assert 7.9e9 < preset("llama3.1-8b").num_params() < 8.1e9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_heads": 6, "num_kv_heads": 4}, "num_heads=6 must be a multiple of num_kv_heads=4"),
        ({"hidden_size": 30}, "hidden_size=30 is not divisible by num_heads=4"),
        ({"remat": "some"}, "remat='some'"),
        ({"vocab_size": 0}, "vocab_size=0"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DecoderConfig(**{**base, **kwargs})


def test_rope_positions_matter(tiny_config):
    """RoPE is relative: shifting every position changes nothing, stretching them changes the logits."""
    ids = np.arange(10, dtype=np.int32)[None]
    params = _init(tiny_config, ids)
    apply = jax.jit(Decoder(tiny_config).apply)
    plain = np.asarray(apply({"params": params}, ids))
    shifted = np.asarray(apply({"params": params}, ids, positions=np.arange(10, dtype=np.int32)[None] + 3))
    stretched = np.asarray(apply({"params": params}, ids, positions=np.arange(10, dtype=np.int32)[None] * 2))
    np.testing.assert_allclose(shifted, plain, atol=1e-4)
    assert np.abs(stretched - plain).max() > 1e-3


# Gemma-like: mixed local/global layers (window 4 at 12 positions), a local RoPE base, q/k and sandwich norms,
# GeGLU, an embedding scale and both soft-caps; 3 layers so that a scanned stack mixes both kinds.
MIXED = dict(num_layers=3, layer_types=("sliding_attention", "full_attention", "sliding_attention"),
             sliding_window=4, rope_local_theta=100.0, qk_norm=True, sandwich_norms=True, norm_plus_one=True,
             activation="gelu_tanh", embed_scale=True, query_pre_attn_scalar=5.0, attn_softcap=2.0, final_softcap=3.0)


@pytest.mark.parametrize("attention,remat,scan", [
    ("xla", "none", False), ("xla", "save_dots", True), ("xla", "full", False), ("reference", "full", True)])
def test_mixed_layers_give_the_same_loss_and_grads_in_every_variant(tiny_config, attention, remat, scan):
    """Per-layer windows reach every implementation and survive scan (one body, lax.cond per layer) and
    remat (a static window per unrolled layer); the unrolled reference attention is the baseline."""
    ids = np.random.default_rng(3).integers(0, 64, (2, 12)).astype(np.int32)
    base_cfg = dataclasses.replace(tiny_config, **MIXED, attention="reference")
    cfg = dataclasses.replace(base_cfg, attention=attention, remat=remat, scan_layers=scan)
    params, base_loss = _assert_variant_matches(base_cfg, cfg, ids)
    # The windows matter: all layers global gives another loss.
    uniform = dataclasses.replace(base_cfg, layer_types=None, sliding_window=None)
    assert abs(float(_loss(uniform, params, ids)) - float(base_loss)) > 1e-4


def test_a_narrow_head_is_widened_block_by_block_with_the_same_logits_and_grads(monkeypatch):
    """A bfloat16 head under float32 compute goes through `head_product`'s loop over vocabulary blocks
    (forced here by a small block size): its logits and both gradients are those of the whole widened
    head, computed by numpy and by jax.grad of one einsum."""
    from sft_sharded.models import decoder

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((8, 48)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.standard_normal((2, 3, 48)), jnp.float32)
    monkeypatch.setattr(decoder, "HEAD_BLOCK_BYTES", 8 * 48 * 4 // 4)  # four blocks of 12
    assert decoder._vocab_blocks(48, 4) == 4 and decoder._vocab_blocks(47, 4) == 1

    def loss(fn, x, head):
        return jnp.sum(fn(x, head) * cotangent)

    ours = jax.jit(lambda x, head: decoder.head_product(x, head, jnp.float32))
    assert "scan" in str(jax.make_jaxpr(ours)(x, head))  # the loop over blocks, not one widened head
    whole = lambda x, head: jnp.einsum("btd,dv->btv", x, head.astype(jnp.float32))  # noqa: E731
    np.testing.assert_allclose(ours(x, head), np.asarray(x, np.float64) @ np.asarray(head, np.float64), rtol=1e-5,
                               atol=1e-5)
    for a, b in zip(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1))(x, head),
                    jax.grad(lambda *a: loss(whole, *a), argnums=(0, 1))(x, head)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)
