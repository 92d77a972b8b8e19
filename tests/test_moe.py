"""The MoE layer against dense references that run every expert on every token and combine them with the
router's weights (numpy float64 for values; a dense jax einsum for gradients), with ties, unbalanced
routing and capacity drops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional import optional

from sft_sharded.models import moe

E, K, D, F = 4, 2, 8, 6


def SWIGLU(gate, up):  # noqa: N802 - the join the grouped MLP is given
    return jax.nn.silu(gate) * up


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) * 0.5 for shape in ((E, D, F), (E, D, F), (E, F, D))]


def _silu(x):
    return x / (1 + np.exp(-x))


def numpy_topk(probs, k):
    """Largest k per row; equal values go to the lower expert id."""
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(probs, order, -1), order


def numpy_moe(x, logits, gate, up, down, k, normalize, keep=None):
    x, logits = np.asarray(x, np.float64), np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    weights, experts = numpy_topk(probs, k)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    every = np.stack([(_silu(x @ gate[e]) * (x @ up[e])) @ down[e] for e in range(E)], 1)  # [N, E, D]
    combine = np.zeros((x.shape[0], E))
    for n in range(x.shape[0]):
        for slot in range(k):
            if keep is None or keep[n, slot]:
                combine[n, experts[n, slot]] += weights[n, slot]
    return np.einsum("ne,ned->nd", combine, every), experts


def _run(x, logits, weights, normalize, capacity=None):
    _, w, experts = moe.route(jnp.asarray(logits), K, normalize)
    keep = None if capacity is None else moe.keep_within_capacity(experts, E, capacity)
    out = moe.grouped_mlp(jnp.asarray(x), experts, w, *map(jnp.asarray, weights), SWIGLU, keep)
    return np.asarray(out), np.asarray(experts), None if keep is None else np.asarray(keep)


@pytest.mark.parametrize("case", ["random", "ties", "one-expert-gets-everything"])
@pytest.mark.parametrize("normalize", [True, False])
def test_dropless_moe_matches_the_dense_reference(case, normalize):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, D)).astype(np.float32)
    logits = rng.standard_normal((12, E)).astype(np.float32)
    if case == "ties":  # all equal, or two equal at the top: the lower ids win
        logits[:4] = 0.0
        logits[4:8, 1] = logits[4:8, 3] = 5.0
    if case == "one-expert-gets-everything":
        logits[:, 2] += 20.0
    out, experts, _ = _run(x, logits, _weights(), normalize)
    expected, expected_experts = numpy_moe(x, logits, *_weights(), K, normalize)
    np.testing.assert_array_equal(experts, expected_experts)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_match_a_dense_all_experts_computation():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((10, D)), jnp.float32)
    router = jnp.asarray(rng.standard_normal((D, E)), jnp.float32)
    weights = [jnp.asarray(w) for w in _weights(3)]
    cotangent = jnp.asarray(rng.standard_normal((10, D)), jnp.float32)
    # One token routed to expert 2 only through a large bias: the unbalanced case has gradients too.
    bias = jnp.zeros((10, E)).at[0, 2].set(10.0)

    def sparse(x, router, gate, up, down):
        _, w, experts = moe.route(x @ router + bias, K, True)
        return jnp.sum(moe.grouped_mlp(x, experts, w, gate, up, down, SWIGLU) * cotangent)

    def dense(x, router, gate, up, down):
        probs = jax.nn.softmax(x @ router + bias)
        w, experts = jax.lax.top_k(probs, K)
        w = w / w.sum(-1, keepdims=True)
        combine = jnp.einsum("nk,nke->ne", w, jax.nn.one_hot(experts, E))
        every = jnp.einsum("nef,efd->ned", jax.nn.silu(jnp.einsum("nd,edf->nef", x, gate))
                           * jnp.einsum("nd,edf->nef", x, up), down)
        return jnp.sum(jnp.einsum("ne,ned->nd", combine, every) * cotangent)

    args = (x, router, *weights)
    got = jax.grad(sparse, argnums=range(5))(*args)
    want = jax.grad(dense, argnums=range(5))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_capacity_drops_exactly_the_pairs_a_numpy_reference_drops():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, D)).astype(np.float32)
    logits = rng.standard_normal((16, E)).astype(np.float32)
    logits[:, 0] += 2.0  # expert 0 is over-subscribed
    cap = moe.capacity(16, K, E, 1.0)
    assert cap == 8
    out, experts, keep = _run(x, logits, _weights(), True, capacity=cap)
    # The reference: walk the pairs in token order, slot order; an expert takes a pair while it has room.
    room, expected_keep = np.zeros(E, int), np.zeros((16, K), bool)
    for n in range(16):
        for slot in range(K):
            e = experts[n, slot]
            expected_keep[n, slot] = room[e] < cap
            room[e] += 1
    np.testing.assert_array_equal(keep, expected_keep)
    assert (~keep).sum() > 0  # something was dropped
    expected, _ = numpy_moe(x, logits, *_weights(), K, True, keep=expected_keep)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --- whole models against transformers ------------------------------------------------------------------
MOE_FAMILIES = ["qwen3-moe", "qwen2-moe", "mixtral", "gpt-oss"]


@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_loss_and_aux_loss_match_transformers_with_padding(kind, tmp_path):
    """Right-padded rows: transformers' attention_mask and our segment id 0 keep padding out of the
    load-balancing loss; the loss is cross entropy + router_aux_loss_coef * aux as transformers adds it."""
    torch = optional("torch")
    from test_hf import import_model, make_hf

    from sft_sharded.models.moe import router_metrics

    model = make_hf(kind, tmp_path / "hf")
    ids = np.random.default_rng(5).integers(1, 128, (2, 16))
    real = np.ones((2, 16), np.int32)
    real[1, 10:] = 0
    labels = np.where(real == 1, ids, -100)
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(real), labels=torch.tensor(labels))
    trainer, cfg, params = import_model(tmp_path / "hf", (1, 1, 1))
    shifted = np.concatenate([labels[:, 1:], np.full((2, 1), -100)], axis=1)
    batch = {"input_ids": ids.astype(np.int32), "labels": shifted.astype(np.int32), "segment_ids": real}
    terms, extra = jax.jit(trainer.loss_terms)(params, batch)
    aux = float(router_metrics(extra["router"], cfg.num_experts)["moe_aux_loss"])
    assert cfg.router_aux_loss_coef == 0.1
    assert aux == pytest.approx(float(out.aux_loss), rel=1e-5)
    assert float(terms.mean()) + 0.1 * aux == pytest.approx(float(out.loss), rel=1e-5)
    # Padding changes nothing: other tokens in the padded tail give the same aux loss.
    repadded = dict(batch, input_ids=np.where(real == 1, ids, 7).astype(np.int32))
    _, extra2 = jax.jit(trainer.loss_terms)(params, repadded)
    assert float(router_metrics(extra2["router"], cfg.num_experts)["moe_aux_loss"]) == pytest.approx(aux, rel=1e-6)
    if not cfg.dense_layers:  # every layer sparse: a scanned stack, loaded shard by shard onto expert groups
        scanned, _, stacked = import_model(tmp_path / "hf", (1, 2, 1), expert=2, scan_layers=True)
        assert stacked["layers"]["moe"]["w_gate"].shape[:2] == (cfg.num_layers, cfg.num_experts)
        logits = np.asarray(jax.jit(scanned.model.apply)({"params": stacked}, ids.astype(np.int32), None, real))
        np.testing.assert_allclose(logits[real == 1], out.logits.numpy()[real == 1], atol=1e-4)
    sparse_layers = cfg.num_layers - len(cfg.dense_layers)
    assert float(extra["router"].tokens) == (16 + 10) * sparse_layers  # real tokens only, in every sparse layer


@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_sharded_expert_parallel_and_accumulated_loss_aux_and_grads_equal_one_device(kind, tmp_path):
    optional("torch")
    from reference import GRAD_TOL, random_batch, to_numpy
    from test_hf import import_model, make_hf

    make_hf(kind, tmp_path / "hf")
    batch = random_batch(0, rows=8, length=16, vocab=128)
    results = []
    # (data, fsdp, tensor), expert groups, micro-batches; accumulation's router-loss gradient needs the whole
    # batch's expert counts (a pre-pass); with expert groups the pairs travel by all-to-all.
    meshes = [((1, 1, 1), 1, 1), ((2, 2, 2), 1, 2)] + ([((1, 2, 2), 2, 1)] if kind != "gpt-oss" else [])
    if kind == "mixtral":  # every case once (the suite's time): tensor=4, expert=4, expert with accumulation
        meshes += [((2, 2, 2), 1, 1), ((1, 2, 4), 1, 1), ((1, 2, 1), 4, 1), ((2, 1, 1), 4, 2)]
    if kind == "gpt-oss":  # expert biases travel with their experts: data=2, fsdp=2, expert=2 (in place of 1x2x2x2)
        meshes += [((2, 2, 1), 2, 1)]
    for mesh, expert, accum in meshes:
        trainer, _, params = import_model(tmp_path / "hf", mesh, expert=expert, grad_accum_steps=accum)
        loss, grads = trainer.loss_and_grad(params, batch)
        terms, _ = jax.jit(trainer.loss_terms)(params, batch)
        results.append((float(loss), float(terms.penalty), to_numpy(grads)))
    (loss_one, penalty_one, grads_one), *sharded = results
    assert penalty_one > 0
    for loss, penalty, grads in sharded:
        np.testing.assert_allclose([loss, penalty], [loss_one, penalty_one], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **GRAD_TOL), grads, grads_one)


def test_cached_generation_matches_transformers_and_lora_adapts_attention_only(tmp_path):
    torch = optional("torch")
    import dataclasses

    from test_hf import import_model, make_hf

    from sft_sharded.generate import greedy_generate
    from sft_sharded.models import DecoderConfig
    from sft_sharded.config import LoraConfig

    model = make_hf("qwen3-moe", tmp_path / "hf")
    trainer, cfg, params = import_model(tmp_path / "hf", (1, 1, 1))
    prompt = np.random.default_rng(6).integers(2, 128, 5)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompt[None]), max_new_tokens=16, do_sample=False,
                                  attention_mask=torch.ones((1, 5), dtype=torch.long))[0, 5:].tolist()
    assert greedy_generate(trainer, params, [prompt.tolist()], max_new_tokens=16)[0] == expected
    attention_only = dataclasses.replace(cfg, lora=LoraConfig(rank=2, targets=("q", "k", "v", "o")))
    assert attention_only.num_adapter_params() > 0
    with pytest.raises(ValueError, match=r"includes \['gate', 'up', 'down'\], but LoRA on experts is not"):
        DecoderConfig(**{**dataclasses.asdict(cfg), "lora": LoraConfig(rank=2)})
