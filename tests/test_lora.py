"""LoRA: the adapted model against a float64 numpy forward of W + scale * A B, step 0 equals the base,
sharded loss and grads equal one device, the base never moves, and no gradient or optimizer state of the
base exists in the compiled step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from reference import GRAD_TOL, llama_logits, random_batch, to_numpy

from sft_sharded import Decoder, SFTTrainer, make_mesh
from sft_sharded.metrics import memory_per_device
from sft_sharded.config import LoraConfig
from sft_sharded.trainers import partition
from sft_sharded.trainers.trainer import CPU_COMPILER_OPTIONS

LORA = LoraConfig(rank=4, alpha=8.0, base_dtype="float32")


def lora_trainer(cfg, mesh_shape=(2, 2, 2), lora=LORA, optimizer=None, **options):
    cfg = dataclasses.replace(cfg, lora=lora)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    trainer = SFTTrainer(Decoder(cfg), optimizer or optax.sgd(0.1), mesh=make_mesh(*mesh_shape, devices=devices),
                         **options)
    return trainer, trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))


def randomize_b(state, seed=1):
    """Non-zero B everywhere (fresh B is zero), so the adapters change the output."""
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(rng.normal(size=x.shape).astype(np.float32) * 0.3, x.sharding)
        if str(path[-1].key).endswith("_lora_b") else x, state.params)
    return state.replace(params=params)


def test_adapted_model_matches_numpy_w_plus_scaled_b_a(tiny_config):
    for lora in (LORA, dataclasses.replace(LORA, rslora=True, targets=("q_proj", "o", "down"))):
        trainer, state = lora_trainer(tiny_config, lora=lora)
        state = randomize_b(state)
        full = to_numpy(partition.merge(state.params, state.frozen))
        merged = {k: v for k, v in full.items()}
        scale = lora.alpha / (np.sqrt(lora.rank) if lora.rslora else lora.rank)
        names = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
        for i in range(tiny_config.num_layers):
            for target in lora.targets:
                part = "attn" if target in "qkvo" else "mlp"
                layer = merged[f"layer_{i}"][part]
                a, b = layer.pop(f"{target}_lora_a"), layer.pop(f"{target}_lora_b")
                layer[names[target]] = layer[names[target]] + scale * np.tensordot(a, b, 1)
        ids = random_batch(0)["input_ids"]
        ours = jax.jit(trainer.model.apply)({"params": partition.merge(state.params, state.frozen)}, ids)
        np.testing.assert_allclose(np.asarray(ours), llama_logits(merged, tiny_config, ids), rtol=2e-4, atol=2e-4)
        assert sum(x.size for x in jax.tree.leaves(state.params)) == sum(
            tiny_config.num_layers * lora.rank * (np.prod(a) + np.prod(b))
            for t, (a, b) in {"q": ((32,), (4, 8)), "k": ((32,), (2, 8)), "v": ((32,), (2, 8)), "o": ((4, 8), (32,)),
                              "gate": ((32,), (64,)), "up": ((32,), (64,)), "down": ((64,), (32,))}.items()
            if t in lora.targets)


def test_step_zero_is_the_base_model(tiny_config):
    trainer, state = lora_trainer(tiny_config)
    batch = random_batch(1)
    lora_loss = trainer.compute_loss(partition.merge(state.params, state.frozen), batch)
    base = SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=trainer.mesh)
    assert float(lora_loss) == float(base.compute_loss(state.frozen, batch))


@pytest.fixture(scope="module")
def one_device_lora_grads():
    from conftest import TINY

    one, state = lora_trainer(TINY, (1, 1, 1))
    state = randomize_b(state)
    loss, grads = one.loss_and_grad(state.params, random_batch(2), state.frozen)
    return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("mesh_shape, accum", [((8, 1, 1), 1), ((1, 8, 1), 1), ((2, 2, 2), 1), ((2, 2, 2), 4)])
def test_lora_loss_and_grads_equal_one_device(tiny_config, mesh_shape, accum, one_device_lora_grads):
    batch = random_batch(2)
    want_loss, want = one_device_lora_grads
    trainer, state = lora_trainer(tiny_config, mesh_shape, grad_accum_steps=accum)
    state = randomize_b(state)
    loss, grads = trainer.loss_and_grad(state.params, batch, state.frozen)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), **GRAD_TOL), grads, want)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))  # A and B both get gradients


def test_base_stays_bit_identical_while_the_loss_falls(tiny_config):
    trainer, state = lora_trainer(tiny_config, optimizer=optax.adamw(1e-2, weight_decay=0.1))
    before = jax.device_get(state.frozen)
    losses = []
    for step in range(20):
        state, metrics = trainer.train_step(state, random_batch(step % 2))
        losses.append(float(metrics["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(state.frozen), before)
    assert losses[-1] < losses[0] - 0.1
    assert set(jax.tree.leaves(jax.tree.map(lambda x: str(x.dtype), state.opt_state))) <= {"float32", "int32"}
    assert jax.tree.structure(state.opt_state[0].mu) == jax.tree.structure(state.params)  # adam: adapters only


def test_the_compiled_step_holds_no_gradient_or_optimizer_state_of_the_base(tiny_config):
    cfg = dataclasses.replace(tiny_config, hidden_size=512, mlp_dim=2048, num_heads=4, num_kv_heads=4,
                              dtype="bfloat16")
    batch = {k: jax.ShapeDtypeStruct((8, 16), jnp.int32) for k in ("input_ids", "labels")}

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    def memory(trainer):
        abstract = trainer.abstract_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
        compiled = trainer.lower("train", abstract, batch).compile()
        return compiled.memory_analysis(), memory_per_device(compiled), abstract

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    # One device's default options depend on the host's CPU (YNN fusion where it has AMX: with it, jax 0.12's
    # full fine-tuning step here had 32.2 MB of temporaries, under one float32 gradient's 33.8 MB), so the
    # options these bounds were measured with are pinned.
    options = dict(CPU_COMPILER_OPTIONS)
    full, full_total, full_state = memory(SFTTrainer(Decoder(cfg), optax.adamw(1e-3), mesh=mesh,
                                                     compiler_options=options))
    lora, lora_total, lora_state = memory(SFTTrainer(Decoder(dataclasses.replace(cfg, lora=LoraConfig(rank=4))),
                                                     optax.adamw(1e-3), mesh=mesh, compiler_options=options))
    base_f32, frozen, adapters = nbytes(full_state.params), nbytes(lora_state.frozen), nbytes(lora_state.params)
    assert frozen == base_f32 // 2  # the base is stored in bfloat16
    # full fine-tuning: params and two Adam moments as arguments, a float32 gradient of every weight
    assert full.argument_size_in_bytes >= 3 * base_f32 and full.temp_size_in_bytes > base_f32
    # LoRA: the arguments are the base, the adapters and their two moments (plus scalars and the batch)
    assert frozen + 3 * adapters <= lora.argument_size_in_bytes <= frozen + 3 * adapters + 4096
    # XLA:CPU's temporaries here are mostly transposed weight copies for the backward dots (about 43 MB
    # in both runs), so the whole step is compared: 62 MB against 149 MB when measured.
    assert lora.temp_size_in_bytes < full.temp_size_in_bytes
    assert lora_total < full_total / 2


# The largest gap between neighbouring NF4 code values (QLoRA, appendix E) is between -1 and -0.69619:
# nearest rounding is off by at most half of it, times the block's absmax (bfloat16 scales add 2^-8).
NF4_HALF_GAP = (1.0 - 0.6961928009986877) / 2


def test_nf4_and_int8_round_trips_stay_within_their_bounds():
    from sft_sharded.models import quant

    w = np.random.default_rng(0).normal(size=(256, 96)).astype(np.float32)
    back = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(w), "nf4", (0,))), np.float32)
    absmax = np.abs(w).reshape(4, 64, 96).max(1, keepdims=True)  # blocks of 64 inputs, one per output column
    error = np.abs(back - w).reshape(4, 64, 96)
    assert (error <= absmax * (NF4_HALF_GAP + 2**-8)).all()
    assert error.max() > absmax.max() * 0.1  # the bound is tight (NF4 really is 4 bits)
    back8 = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(w), "int8", (0,))), np.float32)
    # int8 with a scale per output column: within one quantization step of the column's absmax/127 (qwix
    # maps absmax to 127.5 and clips) plus bfloat16 rounding
    assert (np.abs(back8 - w) <= np.abs(w).max(0) * (1 / 127 + 2**-8)).all()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_qlora_base_is_stored_quantized_on_its_shards_and_the_loss_falls(tiny_config, kind):
    import qwix

    cfg = dataclasses.replace(tiny_config, hidden_size=64, num_heads=4, num_kv_heads=2, mlp_dim=128)
    trainer, state = lora_trainer(cfg, lora=LoraConfig(rank=4, alpha=8.0, base_dtype=kind),
                                  optimizer=optax.adamw(3e-2))
    wq = state.frozen["layer_0"]["attn"]["wq"]
    assert isinstance(wq, qwix.QArray) and wq.qvalue.shape == (64, 4, 16)
    assert wq.qvalue.sharding.spec == P(("fsdp", "context"), "tensor", None)  # the weight's own shards
    assert state.frozen["embedding"].dtype == jnp.bfloat16  # only the projections are quantized
    abstract = trainer.abstract_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    assert jax.tree.structure(abstract.frozen) == jax.tree.structure(state.frozen)
    # step 0 is the base model computed from the dequantized weights
    base = SFTTrainer(Decoder(dataclasses.replace(cfg, dtype="float32")), optax.sgd(0.1), mesh=trainer.mesh)
    dequantized = jax.tree.map(lambda x: x, state.frozen, is_leaf=lambda x: isinstance(x, qwix.QArray))
    dequantized = jax.tree.map(lambda x: qwix.dequantize(x).astype(jnp.float32) if isinstance(x, qwix.QArray)
                               else x.astype(jnp.float32), dequantized, is_leaf=lambda x: isinstance(x, qwix.QArray))
    batch = random_batch(3)
    np.testing.assert_allclose(float(trainer.compute_loss(partition.merge(state.params, state.frozen), batch)),
                               float(base.compute_loss(dequantized, batch)), rtol=1e-5)
    losses = []
    for step in range(12):
        state, metrics = trainer.train_step(state, random_batch(step % 2))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1


def test_lora_dropout_acts_in_training_steps_only_and_is_a_function_of_the_step(tiny_config):
    def run(trainer, steps=2):
        state = randomize_b(trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32)))
        evals = float(trainer.eval_step(state, random_batch(5))["loss"])
        losses = []
        for step in range(steps):
            state, metrics = trainer.train_step(state, random_batch(step))
            losses.append(float(metrics["loss"]))
        return evals, losses

    eval_0, plain = run(lora_trainer(tiny_config)[0])
    dropping = lora_trainer(tiny_config, lora=dataclasses.replace(LORA, dropout=0.5))[0]
    eval_d, dropped = run(dropping)
    assert eval_d == eval_0  # evaluation never drops
    assert dropped[0] != plain[0]  # the first training step already sees a dropped input
    assert run(dropping) == (eval_d, dropped)  # the same seed and steps give the same masks
