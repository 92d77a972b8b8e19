"""SFTTrainer against independent references: a single-device jax loss written here, and numpy."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from reference import GRAD_TOL, llama_logits, masked_ce, random_batch, to_numpy

from sft_sharded import Decoder, SFTTrainer, make_mesh
from sft_sharded.errors import UserError
from sft_sharded.parallel.sharding import unbox

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def reference_loss(model, params, batch, mask):
    """Single-device masked mean cross entropy, written without the library's loss code."""
    logits = model.apply({"params": params}, batch["input_ids"], **{k: batch[k] for k in ("segment_ids", "positions") if k in batch})
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(mask, batch["labels"], 0)[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(mask, picked, 0.0)) / jnp.maximum(mask.sum(), 1)


def single_device(fn, *args):
    """Run `fn` on one device with every input replicated there (no mesh)."""
    device = jax.devices()[0]
    args = jax.device_put(jax.tree.map(np.asarray, args), device)
    return jax.jit(fn)(*args)


def jit_loss(trainer, params, batch):
    """`compute_loss` compiled under the trainer's mesh (eager op-by-op execution is slow on 8 devices)."""
    with trainer.activate():
        return jax.jit(trainer.compute_loss)(params, batch)


def make_trainer(cfg, mesh_shape=(1, 8, 1), optimizer=None, **options):
    mesh = make_mesh(*mesh_shape)
    trainer = SFTTrainer(Decoder(cfg), optimizer or optax.sgd(0.1), mesh=mesh, **options)
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    return trainer, state


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_loss_and_grads_match_single_device_on_every_mesh(tiny_config, mesh_shape):
    trainer, state = make_trainer(tiny_config, mesh_shape)
    batch = random_batch(0)
    mask = (batch["labels"] != 0) & (batch["labels"] != -100)
    params = jax.device_get(state.params)
    ref_loss, ref_grads = single_device(
        jax.value_and_grad(lambda p, b, m: reference_loss(Decoder(tiny_config), p, b, m)), params, batch, mask
    )
    loss, grads = trainer.loss_and_grad(state.params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    if mesh_shape == (2, 2, 2):  # the public method also works eagerly, outside any jit
        np.testing.assert_allclose(trainer.compute_loss(state.params, batch), ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(grads), jax.device_get(ref_grads), **GRAD_TOL)
    # and the loss equals a float64 numpy cross entropy of the single-device logits
    logits = single_device(lambda p, x: Decoder(tiny_config).apply({"params": p}, x), params, batch["input_ids"])
    np.testing.assert_allclose(loss, masked_ce(logits, batch["labels"], mask)[0], rtol=1e-5)


def test_train_step_metrics_and_update_match_reference(tiny_config):
    trainer, state = make_trainer(tiny_config, (2, 2, 2), optimizer=optax.sgd(0.1))
    batch = random_batch(1)
    mask = batch["labels"] != 0
    params = jax.device_get(state.params)
    ref_loss, ref_grads = single_device(
        jax.value_and_grad(lambda p, b, m: reference_loss(Decoder(tiny_config), p, b, m)), params, batch, mask
    )
    state, metrics = trainer.train_step(state, batch)
    assert int(state.step) == 1
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    assert float(metrics["num_tokens"]) == mask.sum()
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(ref_grads), rtol=1e-5)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.device_get(ref_grads))
    chex.assert_trees_all_close(jax.device_get(state.params), expected, **GRAD_TOL)


def test_pad_label_zero_and_ignore_index_are_both_masked(tiny_config):
    trainer, state = make_trainer(tiny_config)
    batch = random_batch(2)
    with_minus_100 = dict(batch, labels=np.where(batch["labels"] == 0, -100, batch["labels"]))
    explicit = dict(batch, loss_mask=batch["labels"] != 0)
    loss = jit_loss(trainer, state.params, batch)
    np.testing.assert_allclose(jit_loss(trainer, state.params, with_minus_100), loss, rtol=1e-6)
    np.testing.assert_allclose(jit_loss(trainer, state.params, explicit), loss, rtol=1e-6)
    # pad_label_id=None: only -100 is padding, so label-0 targets now count and the loss changes
    trainer_no_pad, _ = make_trainer(trainer.model.config, pad_label_id=None)
    assert abs(float(jit_loss(trainer_no_pad, state.params, batch)) - float(loss)) > 1e-3


def test_explicit_loss_mask_counts_token_zero_and_ignores_masked_targets(tiny_config):
    trainer, state = make_trainer(tiny_config)
    batch = random_batch(3)
    mask = np.zeros_like(batch["labels"], bool)
    mask[:, 2:9] = True
    batch["labels"][:, 4] = 0  # a real target with id 0, inside the mask
    batch["loss_mask"] = mask
    loss = jit_loss(trainer, state.params, batch)
    logits = jax.jit(Decoder(tiny_config).apply)({"params": jax.device_get(state.params)}, batch["input_ids"])
    np.testing.assert_allclose(loss, masked_ce(logits, batch["labels"], mask)[0], rtol=1e-5)
    assert float(trainer.eval_step(state, batch)["num_tokens"]) == mask.sum()  # the id-0 targets count
    noise = np.random.default_rng(0).integers(-100, 64, mask.shape).astype(np.int32)
    scrambled = dict(batch, labels=np.where(mask, batch["labels"], noise))
    np.testing.assert_allclose(jit_loss(trainer, state.params, scrambled), loss, rtol=1e-6)


def test_grad_accumulation_is_token_weighted_with_unequal_micro_batches(tiny_config):
    batch = random_batch(4, rows=16)
    mask = np.zeros((16, 16), bool)
    # interleaved micro-batch i holds rows i, i+4, ...: give them 1, 2, 15 and 40 targets
    for micro, count in enumerate([1, 2, 15, 40]):
        rows = np.arange(micro, 16, 4)
        flat = np.zeros(len(rows) * 16, bool)
        flat[:count] = True
        mask[rows] = flat.reshape(len(rows), 16)
    batch["loss_mask"] = mask
    one, state = make_trainer(tiny_config, (2, 4, 1))
    four, _ = make_trainer(tiny_config, (2, 4, 1), grad_accum_steps=4)
    loss1, grads1 = one.loss_and_grad(state.params, batch)
    loss4, grads4 = four.loss_and_grad(state.params, batch)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(grads4), jax.device_get(grads1), **GRAD_TOL)
    # the test can fail: the mean of per-micro-batch means is far from the token-weighted mean
    means = [float(jit_loss(one, state.params, {k: v[i::4] for k, v in batch.items()})) for i in range(4)]
    assert abs(np.mean(means) - float(loss1)) > 1e-2


def test_packed_row_gives_the_same_per_token_losses_as_separate_rows(tiny_config):
    rng = np.random.default_rng(5)
    a, b = rng.integers(1, 64, 6), rng.integers(1, 64, 8)
    apply = jax.jit(Decoder(tiny_config).apply)
    _, state = make_trainer(tiny_config)
    params = jax.device_get(state.params)
    packed = np.zeros((1, 16), np.int32)
    packed[0, :6], packed[0, 6:14] = a, b
    segments = np.array([[1] * 6 + [2] * 8 + [0] * 2], np.int32)
    positions = np.array([list(range(6)) + list(range(8)) + [0, 0]], np.int32)
    logits_packed = apply({"params": params}, packed, positions=positions, segment_ids=segments)
    logits_a = apply({"params": params}, a[None].astype(np.int32))
    logits_b = apply({"params": params}, b[None].astype(np.int32))
    np.testing.assert_allclose(logits_packed[0, :6], logits_a[0], atol=1e-5)
    np.testing.assert_allclose(logits_packed[0, 6:14], logits_b[0], atol=1e-5)
    # without segment ids the second sequence would see the first: the check above is not vacuous
    unmasked = apply({"params": params}, packed, positions=positions)
    assert np.abs(unmasked[0, 6:14] - logits_b[0]).max() > 1e-3


def test_all_masked_batch_gives_zero_loss_and_zero_grads(tiny_config):
    trainer, state = make_trainer(tiny_config, (2, 2, 2), grad_accum_steps=2)
    batch = random_batch(6)
    batch["loss_mask"] = np.zeros_like(batch["labels"], bool)
    loss, grads = trainer.loss_and_grad(state.params, batch)
    assert float(loss) == 0.0
    leaves = jax.tree.leaves(jax.device_get(grads))
    assert all(np.all(g == 0) for g in leaves)
    batch["labels"] = np.full_like(batch["labels"], -100)
    del batch["loss_mask"]
    state, metrics = trainer.train_step(state, batch)
    assert float(metrics["loss"]) == 0.0 and float(metrics["num_tokens"]) == 0.0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state)))


# Logical rules applied by hand for mesh (2, 2, 2): embed->(fsdp, context), heads/kv_heads/mlp/vocab->tensor.
FSDP = ("fsdp", "context")  # weights split over context as over fsdp (context is 1 here)
EXPECTED_SPECS = {
    "embedding": P("tensor", FSDP),
    "lm_head": P(FSDP, "tensor"),
    "final_norm/scale": P(None),
    "layer_0/attn/wq": P(FSDP, "tensor", None),
    "layer_0/attn/wk": P(FSDP, "tensor", None),
    "layer_0/attn/wo": P("tensor", None, FSDP),
    "layer_1/mlp/w_gate": P(FSDP, "tensor"),
    "layer_1/mlp/w_down": P("tensor", FSDP),
    "layer_1/mlp_norm/scale": P(None),
}


def _get(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def test_create_train_state_values_structure_and_shardings(tiny_config):
    optimizer = optax.adamw(1e-3)
    trainer, state = make_trainer(tiny_config, (2, 2, 2), optimizer=optimizer)
    assert int(state.step) == 0
    reference = to_numpy(Decoder(tiny_config).init(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))["params"])
    # equal up to float32 rounding: the jitted init fuses the initializers' math, eager init does not
    chex.assert_trees_all_close(to_numpy(state.params), reference, rtol=1e-6, atol=0)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(optimizer.init(unbox(reference)))
    adam = state.opt_state[0]
    for path, spec in EXPECTED_SPECS.items():
        for tree in (state.params, adam.mu, adam.nu):
            sharding = _get(tree, path).sharding
            assert sharding.mesh.shape == trainer.mesh.shape
            assert sharding.spec == spec, (path, sharding.spec)


def test_fsdp8_each_device_holds_an_eighth_of_fsdp_sharded_leaves(tiny_config):
    trainer, state = make_trainer(tiny_config, (1, 8, 1), optimizer=optax.adamw(1e-3))
    checked = 0
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        spec = leaf.sharding.spec
        if FSDP not in spec:
            assert all(s.data.shape == leaf.shape for s in leaf.addressable_shards)
            continue
        dim = list(spec).index(FSDP)
        expected = list(leaf.shape)
        expected[dim] //= 8
        assert len(leaf.addressable_shards) == 8
        assert all(list(s.data.shape) == expected for s in leaf.addressable_shards)
        checked += 1
    assert checked == 3 * 16  # 16 weight matrices, each in params, mu and nu


class _Plain(nn.Module):
    """A module with no partitioning annotations."""

    @nn.compact
    def __call__(self, ids):
        return nn.Dense(64)(nn.Embed(64, 16)(ids))


def test_unannotated_module_trains_with_replicated_params():
    trainer = SFTTrainer(_Plain(), optax.adam(1e-2), mesh=make_mesh(2, 2, 2))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))
    batch = random_batch(7)
    losses = []
    for _ in range(5):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]


def test_bad_batches_raise_clear_errors(tiny_config):
    trainer, state = make_trainer(tiny_config, (2, 2, 2))
    batch = random_batch(8)
    with pytest.raises(ValueError, match=r"batch size 6 .*data x fsdp x expert = 4"):
        trainer.train_step(state, {k: v[:6] for k, v in batch.items()})
    with pytest.raises(KeyError, match="missing 'labels'"):
        trainer.train_step(state, {"input_ids": batch["input_ids"]})
    with pytest.raises(TypeError, match=r"batch\['input_ids'\] must hold integer ids, got dtype float32"):
        trainer.train_step(state, dict(batch, input_ids=batch["input_ids"].astype(np.float32)))
    with pytest.raises(ValueError, match=r"batch\['labels'\] has shape \(8, 15\)"):
        trainer.train_step(state, dict(batch, labels=batch["labels"][:, :15]))
    with pytest.raises(KeyError, match="unknown keys"):
        trainer.train_step(state, dict(batch, attention_mask=batch["labels"]))
    accum, accum_state = make_trainer(tiny_config, (2, 2, 2), grad_accum_steps=3)
    with pytest.raises(ValueError, match="batch size 8 is not divisible by grad_accum_steps=3"):
        accum.train_step(accum_state, random_batch(9, rows=8))


def test_chunked_loss_trainer_matches_the_plain_trainer(tiny_config):
    plain, state = make_trainer(tiny_config, (2, 2, 2))
    chunked, _ = make_trainer(tiny_config, (2, 2, 2), loss_chunk_size=6)
    batch = random_batch(10)
    loss_p, grads_p = plain.loss_and_grad(state.params, batch)
    loss_c, grads_c = chunked.loss_and_grad(state.params, batch)
    np.testing.assert_allclose(loss_c, loss_p, rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(grads_c), jax.device_get(grads_p), **GRAD_TOL)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_cpu_compiler_options_change_no_numbers(tiny_config, mesh_shape):
    """One CPU device's options (no YNN fusion) and a CPU mesh's (oneDNN) change speed only: each gives the
    loss and grads of XLA's defaults."""
    from sft_sharded.trainers.trainer import CPU_COMPILER_OPTIONS, CPU_MESH_COMPILER_OPTIONS

    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    options = CPU_COMPILER_OPTIONS if mesh.devices.size == 1 else CPU_MESH_COMPILER_OPTIONS
    tuned = SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=mesh, compiler_options=dict(options))
    state = tuned.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    plain = SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=mesh, compiler_options={})
    assert plain.compiler_options == {}  # options given are kept as given
    batch = random_batch(0)
    loss_tuned, grads_tuned = tuned.loss_and_grad(state.params, batch)
    loss_plain, grads_plain = plain.loss_and_grad(state.params, batch)
    np.testing.assert_allclose(loss_tuned, loss_plain, rtol=1e-6)
    chex.assert_trees_all_close(jax.device_get(grads_tuned), jax.device_get(grads_plain), **GRAD_TOL)


def test_default_cpu_compiler_options_follow_the_mesh_and_the_cpu(tiny_config):
    """YNN fusion off on one CPU device unless the CPU has AMX; oneDNN on a CPU mesh whatever the CPU."""
    from sft_sharded.trainers.trainer import (CPU_COMPILER_OPTIONS, CPU_MESH_COMPILER_OPTIONS,
                                              default_compiler_options)

    one, several = make_mesh(1, 1, 1, devices=jax.devices()[:1]), make_mesh(2, 2, 2)
    amx, avx = frozenset({"avx512_bf16", "amx_bf16", "amx_tile"}), frozenset({"avx2", "avx512_bf16"})
    assert default_compiler_options(one, amx) == {}
    assert default_compiler_options(one, avx) == default_compiler_options(one, frozenset()) == CPU_COMPILER_OPTIONS
    assert default_compiler_options(several, amx) == default_compiler_options(several, avx) == CPU_MESH_COMPILER_OPTIONS
    trainer = SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=one)  # this host's flags
    assert trainer.compiler_options == default_compiler_options(one)
    assert SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=one, compiler_options={}).compiler_options == {}


def test_labels_out_of_range_are_refused_before_compiling(tiny_config):
    trainer = SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=make_mesh(2, 2, 2))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    ids = np.ones((8, 16), np.int32)
    for key, value in (("labels", 64), ("labels", -1), ("input_ids", 70)):
        batch = {"input_ids": ids.copy(), "labels": ids.copy()}
        batch[key][3, 5] = value
        with pytest.raises(UserError, match=rf"batch\['{key}'\] holds {value} \(1 such value"):
            trainer.train_step(state, batch)


def test_minus_100_is_never_a_target_even_under_an_all_ones_loss_mask(tiny_config):
    """The Hugging Face habit: attention_mask passed as the loss mask. numpy float64 reference."""
    trainer, state = make_trainer(tiny_config, (2, 2, 2))
    batch = random_batch(7)
    batch["labels"][:, ::3] = -100
    batch["loss_mask"] = np.ones_like(batch["labels"], bool)
    real = batch["labels"] != -100
    expected, _ = masked_ce(llama_logits(state.params, tiny_config, batch["input_ids"]), batch["labels"], real)
    state, metrics = trainer.train_step(state, batch)
    assert float(metrics["num_tokens"]) == real.sum()
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


def test_per_message_weights_give_the_weighted_mean_of_independent_references(tiny_config):
    """A float loss_mask (per-message weights) with packing and grad accumulation: the loss is the numpy
    sum of weight x token loss over the sum of weights, the gradient that of a plain jax weighted mean."""
    batch = random_batch(7, rows=8)
    seg = np.ones((8, 16), np.int32)
    seg[:, 9:] = 2
    seg[::2, 13:] = 0
    batch["segment_ids"] = seg
    batch["positions"] = np.where(np.arange(16) < 9, np.arange(16), np.arange(16) - 9).astype(np.int32)[None].repeat(8, 0)
    weights = np.random.default_rng(7).choice([0.0, 0.5, 1.0, 2.0], size=(8, 16)).astype(np.float32)
    batch["loss_mask"] = np.where(seg > 0, weights, 0.0).astype(np.float32)
    trainer, state = make_trainer(tiny_config, (2, 2, 2), grad_accum_steps=2)
    loss, grads = trainer.loss_and_grad(state.params, batch)
    params = to_numpy(state.params)
    logits = llama_logits(params, tiny_config, batch["input_ids"], batch["positions"], seg)
    _, per_token = masked_ce(logits, batch["labels"], batch["loss_mask"] != 0)
    w = batch["loss_mask"].astype(np.float64)
    np.testing.assert_allclose(float(loss), np.sum(w * per_token) / np.sum(w), rtol=1e-5)
    assert abs(float(loss) - masked_ce(logits, batch["labels"], w != 0)[0]) > 1e-3  # the weights matter

    def weighted_mean(p):
        logits = trainer.model.apply({"params": p}, batch["input_ids"], batch["positions"], seg)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, batch["labels"][..., None], -1)[..., 0]
        return -jnp.sum(batch["loss_mask"] * picked) / jnp.sum(batch["loss_mask"])

    expected = single_device(jax.grad(weighted_mean), params)
    chex.assert_trees_all_close(jax.device_get(grads), jax.device_get(expected), **GRAD_TOL)
