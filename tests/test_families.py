"""The 2026 families (Qwen3, Gemma 2, Gemma 3, Qwen2 with sliding layers, OLMo 3, SmolLM3, Phi-3,
Ministral 3, gpt-oss, Gemma 4, Qwen3.5 dense and MoE) against
transformers: packed rows, a scanned stack of mixed layers (windows, RoPE or none), KV-cache decoding
against `generate`, sharded steps against one device, and the multimodal checkpoints' text decoders with their
towers carried through export. Logits before and after export are in test_hf.py (`FAMILIES`)."""

import jax.numpy as jnp
import numpy as np
import pytest
from optional import optional
from reference import GRAD_TOL, random_batch, to_numpy

torch = optional("torch")
transformers = optional("transformers")

import jax  # noqa: E402
from test_hf import BASE, FAMILIES, QWEN3_5, assert_packed_rows_match, hf_logits, import_model, make_hf  # noqa: E402

from sft_sharded.families import MULTIMODAL  # noqa: E402
from sft_sharded.generate import greedy_generate  # noqa: E402
from sft_sharded.hf.weights import save_pretrained  # noqa: E402
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
        # differ by up to 1.4e-5 of a tensor's largest on an AMD host, 3.7e-5 with jax 0.10 on an Intel one
        # with AMX, 1e-5 with jax 0.12 there; in float64 matmuls the differences shrink tenfold). A sharding
        # mistake (a missing sum, a wrong shard) is off by the gradient's own size.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=GRAD_TOL["rtol"], atol=max(GRAD_TOL["atol"], 6e-5 * np.abs(b).max())), grads, grads_one)


def _multimodal(kind):
    """A tiny multimodal transformers model: its text decoder (one of FAMILIES) beside a vision tower."""
    if kind == "gemma3":
        # A final cap the class never applies (Gemma3ForCausalLM would).
        text = {**BASE, "head_dim": 24, "sliding_window": 8, "query_pre_attn_scalar": 20,
                "layer_types": ["sliding_attention", "full_attention"], "final_logit_softcapping": 3.0}
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        return transformers.Gemma3Config(
            text_config={**text, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, vision_config=vision,
            mm_tokens_per_image=4, image_token_index=125, boi_token_index=126, eoi_token_index=127)
    if kind == "gemma4":  # every Gemma 4 layer feature, a vision tower and an audio tower
        text = {**BASE, **FAMILIES["gemma4"][2], "model_type": "gemma4_text"}
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)
        audio = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                     output_proj_dims=32)
        # Placeholder ids past the vocabulary (transformers maps them to pad): a text-only generation
        # never meets them, where a random model's greedy tokens could otherwise be an image's.
        return transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=audio,
                                         image_token_id=130, audio_token_id=131, video_token_id=132,
                                         boi_token_id=133, eoi_token_id=134, boa_token_id=135, eoa_token_index=136)
    if kind == "qwen3_5":  # untied by the class's own default; image placeholders past the vocabulary
        text = {**BASE, **QWEN3_5, "model_type": "qwen3_5_text"}
        vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
        return transformers.Qwen3_5Config(text_config=text, vision_config=vision)
    text = {**BASE, **FAMILIES["ministral3"][2], "model_type": "ministral3"}
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=16, image_size=28, patch_size=14)
    # Untied: the class ties by its own tie_word_embeddings (default true), whatever text_config says.
    return transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=125,
                                       tie_word_embeddings=False)


@pytest.mark.parametrize("kind", ["gemma3", "mistral3", "gemma4", "qwen3_5"])
def test_multimodal_checkpoints_train_their_text_and_export_the_towers_untouched(kind, tmp_path):
    """Gemma3ForConditionalGeneration (SigLIP tower), Mistral3ForConditionalGeneration (Pixtral tower,
    Ministral 3 text), Gemma4ForConditionalGeneration (vision and audio towers) and
    Qwen3_5ForConditionalGeneration (vision tower, an mtp.* tensor): text-only logits equal transformers', the
    export loads as the same class with the towers byte-identical, and transformers' greedy `generate` on a
    text prompt equals ours."""
    from sft_sharded.hf.weights import SafetensorsDir

    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(_multimodal(kind)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "bias" in name or "norm" in name else 0.05))
    model.save_pretrained(tmp_path / "hf")
    if kind == "qwen3_5":  # published checkpoints hold a multi-token-prediction head transformers does not load
        from safetensors.numpy import load_file, save_file
        stored = load_file(tmp_path / "hf" / "model.safetensors")
        stored["mtp.fc.weight"] = np.random.default_rng(0).normal(size=(64, 128)).astype(np.float32)
        save_file(stored, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    trainer, cfg, params = import_model(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(3, 120, (2, 24))
    ours = np.asarray(jax.jit(trainer.model.apply)({"params": params}, ids.astype(np.int32)))
    assert np.abs(ours - hf_logits(model, ids)).max() <= 1e-4

    save_pretrained(params, cfg, tmp_path / "out", source_dir=tmp_path / "hf")
    reloaded, info = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out",
                                                                             output_loading_info=True)
    reloaded.eval()
    assert type(reloaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert np.abs(hf_logits(reloaded, ids) - ours).max() <= 1e-4
    if kind == "gemma3":
        assert reloaded.config.text_config.final_logit_softcapping == 3.0
    if kind == "qwen3_5":  # the image position sections go back as they were (text never uses them)
        assert reloaded.config.text_config.rope_parameters == model.config.text_config.rope_parameters
    before, after = SafetensorsDir(tmp_path / "hf"), SafetensorsDir(tmp_path / "out")
    multimodal = MULTIMODAL[model.config.model_type]
    towers = [n for n in before.entries if "language_model." not in n and n not in multimodal.heads]
    assert len(towers) > 10 and all(n.startswith(multimodal.towers) for n in towers)
    assert kind != "qwen3_5" or "mtp.fc.weight" in towers
    for name in towers:
        assert np.asarray(before.get(name)).tobytes() == np.asarray(after.get(name)).tobytes(), name

    prompt = ids[0, :5]
    reloaded.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = reloaded.generate(torch.tensor(prompt[None]), max_new_tokens=8, do_sample=False,
                                     attention_mask=torch.ones((1, 5), dtype=torch.long))[0, 5:].tolist()
    assert greedy_generate(trainer, params, [prompt.tolist()], max_new_tokens=8)[0] == expected
