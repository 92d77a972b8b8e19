"""fit(): throughput on all positions and on real (non-pad) tokens, with MFU for both."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from reference import random_batch

from sft_sharded import Llama, SFTTrainer, make_mesh
from sft_sharded.metrics import flops_per_token
from sft_sharded.trainers.loop import fit


def _padded_batch(seed: int) -> dict[str, np.ndarray]:
    batch = random_batch(seed)
    segments = np.ones_like(batch["input_ids"])
    segments[:, 12:] = 0  # the last 4 of 16 positions are padding: 75% real tokens
    return {**batch, "segment_ids": segments}


def test_fit_reports_real_token_throughput_and_both_mfus(tiny_config):
    trainer = SFTTrainer(Llama(tiny_config), optax.sgd(0.1), mesh=make_mesh(1, 8, 1))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    batch = _padded_batch(0)
    state, metrics = trainer.train_step(state, batch)
    assert float(metrics["num_real_tokens"]) == np.count_nonzero(batch["segment_ids"]) == 96

    batches = (_padded_batch(seed) for seed in itertools.count(1))
    _, records = fit(trainer, state, batches, steps=5, log_every=2, flops_per_token=flops_per_token(tiny_config, 16))
    timed = [r for r in records if "tokens_per_sec" in r]
    assert timed, records
    for record in timed:
        np.testing.assert_allclose(record["real_tokens_per_sec"] / record["tokens_per_sec"], 0.75, rtol=1e-9)
        assert {"mfu", "mfu_real_tokens"} <= set(record)  # NaN on CPU: it has no published peak
