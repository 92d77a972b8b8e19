"""Schedule values against the formula, weight-decay mask, clipping."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sft_sharded.config import OptimConfig
from sft_sharded.optim import decay_mask, make_optimizer, make_schedule


def test_warmup_then_cosine_matches_formula():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1)
    schedule = make_schedule(cfg, total_steps=110)
    for step in (0, 5, 10):
        np.testing.assert_allclose(schedule(step), step / 10, rtol=1e-6)
    for step in (10, 35, 60, 110):
        frac = (step - 10) / 100
        np.testing.assert_allclose(schedule(step), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)), rtol=1e-5)


def test_linear_and_constant_schedules():
    linear = make_schedule(OptimConfig(lr=2.0, warmup_steps=0, schedule="linear", end_lr_ratio=0.0), 100)
    np.testing.assert_allclose([linear(0), linear(50), linear(100)], [2.0, 1.0, 0.0], atol=1e-6)
    constant = make_schedule(OptimConfig(lr=2.0, warmup_steps=4, schedule="constant"), 100)
    np.testing.assert_allclose([constant(2), constant(4), constant(90)], [1.0, 2.0, 2.0], atol=1e-6)


def test_decay_mask_skips_norms_and_biases():
    params = {"layer_0": {"attn": {"wq": 1, "wq_bias": 1}, "attn_norm": {"scale": 1}}, "embedding": 1,
              "layers": {"mlp_norm": {"scale": 1}, "mlp": {"w_up": 1}}}
    mask = decay_mask(params)
    assert mask == {"layer_0": {"attn": {"wq": True, "wq_bias": False}, "attn_norm": {"scale": False}},
                    "embedding": True, "layers": {"mlp_norm": {"scale": False}, "mlp": {"w_up": True}}}


def test_weight_decay_applies_only_where_the_mask_says():
    cfg = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, clip_norm=None)
    tx = make_optimizer(cfg, 10)
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
    zeros = {"w": jnp.zeros((2, 2)), "norm": {"scale": jnp.zeros((2,))}}
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)


def test_clipping_bounds_the_gradient_adam_sees():
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, b1=0.9, clip_norm=1.0)
    tx = make_optimizer(cfg, 10)
    params = {"w": jnp.zeros((4,))}
    _, state = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)  # global norm 20
    (mu,) = optax.tree_utils.tree_get_all_with_path(state, "mu")
    np.testing.assert_allclose(optax.global_norm(mu[1]), (1 - 0.9) * 1.0, rtol=1e-6)  # first moment of the clipped grad


@pytest.mark.parametrize("kwargs, key", [({"lr": 0}, "optim.lr"), ({"grad_accum_steps": 0}, "optim.grad_accum_steps"),
                                         ({"end_lr_ratio": 2.0}, "optim.end_lr_ratio")])
def test_optim_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        OptimConfig(**kwargs)


def test_a_schedule_whose_every_update_is_zero_is_reported():
    with pytest.warns(UserWarning, match=r"optim.warmup_steps=1 with 1 step\(s\): every update has learning rate 0"):
        make_optimizer(OptimConfig(warmup_steps=1), total_steps=1)
    with pytest.warns(UserWarning, match="every update has learning rate 0"):
        make_optimizer(OptimConfig(warmup_steps=5), total_steps=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_optimizer(OptimConfig(warmup_steps=1), total_steps=2)  # the second update has lr > 0
        make_optimizer(OptimConfig(warmup_steps=0), total_steps=1)
