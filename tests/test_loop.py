"""fit(): throughput on all positions and on real (non-pad) tokens, with MFU for both."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import random_batch

from sft_sharded import Decoder, SFTTrainer, make_mesh
from sft_sharded.errors import TrainingDiverged
from sft_sharded.metrics import flops_per_token
from sft_sharded.trainers.loop import evaluate, evaluate_sources, fit


def _padded_batch(seed: int) -> dict[str, np.ndarray]:
    batch = random_batch(seed)
    segments = np.ones_like(batch["input_ids"])
    segments[:, 12:] = 0  # the last 4 of 16 positions are padding: 75% real tokens
    return {**batch, "segment_ids": segments}


def test_fit_reports_real_token_throughput_and_both_mfus(tiny_config, monkeypatch):
    trainer = SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=make_mesh(1, 8, 1))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    batch = _padded_batch(0)
    state, metrics = trainer.train_step(state, batch)
    assert float(metrics["num_real_tokens"]) == np.count_nonzero(batch["segment_ids"]) == 96

    batches = (_padded_batch(seed) for seed in itertools.count(1))
    flops = flops_per_token(tiny_config, 16)
    state, records = fit(trainer, state, batches, steps=5, log_every=2, flops_per_token=flops)
    timed = [r for r in records if "tokens_per_sec" in r]
    assert timed, records
    for record in timed:
        np.testing.assert_allclose(record["real_tokens_per_sec"] / record["tokens_per_sec"], 0.75, rtol=1e-9)
        assert not {"mfu", "mfu_real_tokens"} & set(record)  # a CPU has no published peak: absent, not NaN
    from sft_sharded.trainers import loop

    monkeypatch.setattr(loop, "peak_flops", lambda kind: 1e12)  # a chip whose peak is known
    _, records = fit(trainer, state, batches, steps=9, log_every=2, flops_per_token=flops)
    assert any("mfu" in r for r in records)
    for record in (r for r in records if "tokens_per_sec" in r):
        np.testing.assert_allclose(record["mfu"], record["tokens_per_sec"] * flops / 8 / 1e12, rtol=1e-9)
        np.testing.assert_allclose(record["mfu_real_tokens"], record["real_tokens_per_sec"] * flops / 8 / 1e12,
                                   rtol=1e-9)


def test_the_compile_step_record_reports_no_throughput(tiny_config):
    trainer = SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=make_mesh(1, 8, 1))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    _, records = fit(trainer, state, (_padded_batch(s) for s in itertools.count()), steps=3, log_every=1)
    first = records[0]
    assert "compile_and_first_step_s" in first
    assert not {"tokens_per_sec", "real_tokens_per_sec", "step_time_s"} & set(first), first
    assert all("real_tokens_per_sec" in r for r in records[1:])


def test_an_all_masked_batch_logs_loss_0_and_warns(tiny_config):
    trainer = SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=make_mesh(1, 8, 1))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    masked = {**random_batch(0), "loss_mask": np.zeros((8, 16), bool)}
    with pytest.warns(UserWarning, match="step 2: the batch has no trained target"):
        _, records = fit(trainer, state, itertools.chain([random_batch(1)], itertools.repeat(masked)), steps=2,
                         log_every=1)
    assert records[-1]["loss"] == 0.0 and records[-1]["num_tokens"] == 0.0


class _NanAtStep(SFTTrainer):
    """Returns a NaN loss on batches whose first token is 63: the loop's handling is under test here."""

    def loss_terms(self, params, batch):
        terms, extra = super().loss_terms(params, batch)
        poison = jnp.where(batch["input_ids"][0, 0] == 63, jnp.nan, 0.0)
        return terms._replace(loss_sum=terms.loss_sum + poison), extra


def test_a_nan_loss_stops_the_loop_before_a_save_sees_that_state(tiny_config):
    trainer = _NanAtStep(Decoder(tiny_config), optax.sgd(0.1), mesh=make_mesh(1, 8, 1))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))

    def batches():
        for step in itertools.count(1):
            batch = random_batch(step)
            batch["input_ids"][0, 0] = 63 if step == 4 else 1
            yield batch

    saved = []
    with pytest.raises(TrainingDiverged, match="step 4: the loss is nan"):
        fit(trainer, state, batches(), steps=6, log_every=1, save_due=lambda step: step % 2 == 0,
            after_step=lambda step, state: saved.append(step) or False)
    assert saved == [1, 2, 3]  # after_step runs for every dispatched step; step 4 (a save step) never got there


def test_a_mixture_logs_router_metrics_and_dropped_pairs(tiny_config):
    """Capacity 0.5: experts keep half their share, so pairs are dropped, counted and logged with the
    aux loss and the expert load."""
    import dataclasses

    cfg = dataclasses.replace(tiny_config, num_experts=4, experts_per_token=2, moe_mlp_dim=16, capacity_factor=0.5,
                              router_aux_loss_coef=0.01)
    trainer = SFTTrainer(Decoder(cfg), optax.sgd(0.1), mesh=make_mesh(1, 4, 1, expert=2))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    _, records = fit(trainer, state, (_padded_batch(s) for s in itertools.count()), steps=2, log_every=1)
    last = records[-1]
    assert {"moe_aux_loss", "moe_z_loss", "moe_load_min", "moe_load_max", "moe_dropped"} <= set(last), last
    assert last["moe_dropped"] > 0 and 0 <= last["moe_load_min"] <= 0.25 <= last["moe_load_max"] <= 1
    assert np.isfinite(last["moe_aux_loss"]) and last["moe_aux_loss"] > 0
    # The step's own metrics are scalars: the router's sums become metrics, they are not returned as well.
    fresh = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    _, metrics = trainer.train_step(fresh, _padded_batch(0))
    assert "router" not in metrics and all(np.ndim(v) == 0 for v in jax.device_get(metrics).values()), metrics


def test_per_source_eval_combines_to_one_pass_over_every_batch(tiny_config):
    """Per-source held-out loss and accuracy (several data.eval_path files), and the overall numbers from
    their sums equal a single pass over all the batches."""
    trainer = SFTTrainer(Decoder(tiny_config), optax.sgd(0.1), mesh=make_mesh(2, 2, 2))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    a, b = [_padded_batch(1), _padded_batch(2)], [_padded_batch(3)]
    split = evaluate_sources(trainer, state, {"a": a, "b": b})
    whole = evaluate(trainer, state, a + b)
    for key in ("eval_loss", "eval_accuracy", "eval_num_tokens"):
        np.testing.assert_allclose(split[key], whole[key], rtol=1e-6)
        np.testing.assert_allclose(split[f"{key}/b"], evaluate(trainer, state, b)[key], rtol=1e-6)
    assert split["eval_num_tokens/a"] + split["eval_num_tokens/b"] == whole["eval_num_tokens"]
    assert abs(split["eval_loss/a"] - split["eval_loss/b"]) > 1e-4  # the sources differ: the split is visible
