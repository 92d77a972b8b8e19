"""The 2026 families (Qwen3, Gemma 2, Gemma 3, Qwen2 with sliding layers, OLMo 3, SmolLM3, Phi-3,
Ministral 3, gpt-oss, Gemma 4, Qwen3.5 dense and MoE) against
transformers: packed rows, a scanned stack of mixed layers (windows, RoPE or none), KV-cache decoding
against `generate`, and sharded steps against one device. Logits before and after export are in test_hf.py (`FAMILIES`)."""

import jax.numpy as jnp
import numpy as np
import pytest
from reference import GRAD_TOL, random_batch, to_numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from test_hf import assert_packed_rows_match, hf_logits, import_model, make_hf  # noqa: E402

from sft_sharded.generate import greedy_generate  # noqa: E402
from sft_sharded.models.decoder import init_cache  # noqa: E402

NEW_FAMILIES = ["qwen2-sliding-layers", "qwen3", "gemma2", "gemma3", "olmo3", "smollm3", "phi3", "ministral3", "gpt-oss",
                "gemma4", "qwen3_5", "qwen3_5-moe"]
LAYERWISE = ("gemma4", "qwen3_5", "qwen3_5-moe")  # layers of different shapes: unrolled, not scanned


@pytest.mark.parametrize("kind", NEW_FAMILIES)
def test_packed_rows_and_cached_decoding_match_transformers(kind, tmp_path):
    """Scanned layers (mixed windows go through one scan body; Gemma 4's and Qwen3.5's layers differ in
    shape, so they stay unrolled), segments longer than the 8-key window, and 16 greedy tokens after a 5-token
    prompt (the window slides during decoding; Gemma 4's last layers attend with their source layers' caches;
    Qwen3.5's linear layers prefill with the chunked delta rule, then step with the recurrent one)."""
    model = make_hf(kind, tmp_path / "hf")
    trainer, _, params = import_model(tmp_path / "hf", (1, 1, 1), scan_layers=kind not in LAYERWISE)
    rng = np.random.default_rng(1)
    assert_packed_rows_match(model, trainer, params, rng)

    prompt = rng.integers(2, 128, 5)
    model.generation_config.eos_token_id = None  # 16 tokens, whatever they are
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompt[None]), max_new_tokens=16, do_sample=False,
                                  attention_mask=torch.ones((1, 5), dtype=torch.long))[0, 5:].tolist()
    assert greedy_generate(trainer, params, [prompt.tolist()], max_new_tokens=16)[0] == expected
    # Greedy tokens alone hardly depend on far context in a random model: compare the cached logits of every
    # step with transformers' forward over the whole sequence too.
    sequence = np.concatenate([prompt, expected])[None]
    np.testing.assert_allclose(cached_logits(trainer, params, sequence, 5), hf_logits(model, sequence)[0, 4:-1],
                               atol=1e-4)


def cached_logits(trainer, params, ids_1xT, prompt_len):
    """Logits of the KV-cache path: the prompt in one call, then one token per call."""
    cfg = trainer.model.config
    decode = jax.jit(lambda p, ids, pos, cache: trainer.model.apply({"params": p}, ids, pos, jnp.ones_like(ids), cache,
                                                                    method="decode"))
    cache = init_cache(cfg, 1, ids_1xT.shape[1])
    logits, cache = decode(params, ids_1xT[:, :prompt_len], np.arange(prompt_len)[None], cache)
    out = [logits[0, -1]]
    for t in range(prompt_len, ids_1xT.shape[1] - 1):
        logits, cache = decode(params, ids_1xT[:, t:t + 1], np.array([[t]]), cache)
        out.append(logits[0, -1])
    return np.stack(out)


@pytest.mark.parametrize("kind", NEW_FAMILIES)
def test_sharded_loss_and_grads_equal_one_device(kind, tmp_path):
    """2x2x2 (tensor=2 splits the heads, OLMo's norm over all heads included; Qwen3.5's linear-attention
    heads too), and for the first four kinds and Qwen3.5 tensor=4 with 2 kv heads (and 2 q/k heads of the
    linear layers) it cannot divide (replicated there)."""
    make_hf(kind, tmp_path / "hf")
    batch = random_batch(0, rows=8, length=24, vocab=128)
    results = []
    # Qwen3.5 accumulates two micro-batches of 4 rows on 2x2x2: exact only if both the split over the mesh
    # and the token-weighted accumulation are (one compile for both)
    runs = [((1, 1, 1), 1), ((2, 2, 2), 2 if kind in ("qwen3_5", "qwen3_5-moe") else 1)]
    if kind in NEW_FAMILIES[:4] + ["qwen3_5", "qwen3_5-moe"]:
        runs.append(((1, 2, 4), 1))
    for mesh, accumulate in runs:
        trainer, _, params = import_model(tmp_path / "hf", mesh, grad_accum_steps=accumulate)
        loss, grads = trainer.loss_and_grad(params, batch)
        results.append((float(loss), to_numpy(grads)))
    (loss_one, grads_one), *sharded = results
    for loss, grads in sharded:
        np.testing.assert_allclose(loss, loss_one, rtol=1e-5)
        # float32 sums in another order: differences scale with each gradient's size (Gemma 4's reach 0.75 and
        # differ by up to 1.4e-5 of a tensor's largest; in float64 matmuls the differences shrink tenfold)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=GRAD_TOL["rtol"], atol=max(GRAD_TOL["atol"], 3e-5 * np.abs(b).max())), grads, grads_one)
