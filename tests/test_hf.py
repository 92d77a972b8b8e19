"""Parity with Hugging Face transformers (PyTorch CPU): import, logits, packing, export and reload."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optional import optional

from sft_sharded.trainers.trainer import CPU_COMPILER_OPTIONS
from sft_sharded import Decoder, SFTTrainer, make_mesh
from sft_sharded.errors import UserError
from sft_sharded.hf.weights import config_from_hf, load_params, save_pretrained

torch = optional("torch")
transformers = optional("transformers")

BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-5)
QWEN3_5 = dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
               head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
               linear_value_head_dim=8, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25})
FAMILIES = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=5e5)),
    "llama-tied-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-attention-bias": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, attention_bias=True)),
    "llama-mlp-bias": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, mlp_bias=True)),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "mistral-untied": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    # 8-key window at 24 positions: the window masks most of each row's history
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=8)),
    # The 2026 families, each with choices that catch mistakes: head_dim 24 (not hidden / heads = 16), GQA,
    # 8-key windows at 24 positions on some layers only, a query_pre_attn_scalar that is not head_dim, and
    # soft-capping that bites (caps of 2 and 3, not Gemma 2's 50 and 30, which small random logits never reach).
    "qwen2-sliding-layers": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        tie_word_embeddings=False, use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=24, rope_theta=1e6)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=24, query_pre_attn_scalar=20, sliding_window=8, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, rms_norm_eps=1e-6)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"], head_dim=24,
        query_pre_attn_scalar=20, sliding_window=8, rope_theta=1e4, rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # Mixtures of experts: 4 experts, top 2, dense layers between sparse ones, a shared expert, the aux loss on.
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_hidden_layers=3, head_dim=24, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
        mlp_only_layers=[1], norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.1)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=56,
        decoder_sparse_step=2, output_router_logits=True, router_aux_loss_coef=0.1)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)),
    # Late-2026 families: OLMo's norms after each block and q/k norm over all heads (with biases here, which
    # its published configs leave off); OLMo 3's sliding layers with YaRN on the full layers only (the file
    # transformers writes has rope_parameters per layer type; test_olmo3_published_rope_fields_read_as_transformers
    # reads the older form its published config.json has); SmolLM3's layers without RoPE, with windows on those.
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(tie_word_embeddings=False, attention_bias=True,
                                                       rope_theta=5e5)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        num_hidden_layers=4, tie_word_embeddings=False, sliding_window=8, rope_theta=5e5,
        rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8,
                      "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.2079441541679836},
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=8, rope_theta=1e4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Phi-3/4: fused qkv_proj and gate_up_proj (split on import, fused again on export), partial rotary
    # (Phi-4-mini's 0.75 of a 16-wide head: 12 dims), an 8-key window on every layer.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        tie_word_embeddings=False, partial_rotary_factor=0.75, sliding_window=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, original_max_position_embeddings=32)),
    # Ministral 3: YaRN and queries scaled by position; an original length of 8 so that 24 positions reach
    # floor(pos / 8) = 2, and a beta of 0.5 so the scale bites.
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", dict(
        tie_word_embeddings=False, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 8,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "llama_4_scaling_beta": 0.5})),
    # gpt-oss: sinks, biases everywhere, sliding/full layers, the router's bias, interleaved gate/up and a
    # SwiGLU clamp of 0.5 that bites on these small activations (the real one is 7).
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        tie_word_embeddings=False, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        swiglu_limit=0.5, output_router_logits=True, router_aux_loss_coef=0.1, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
    # Gemma 4 with every layer-shape feature: 16-wide sliding heads and 32-wide full ones with values = keys
    # over 1 kv head of their own, proportional RoPE on a quarter of the full heads, per-layer inputs from a
    # table, the last two layers sharing the first two's keys and values with doubled MLPs, a final
    # soft-cap of 3 that bites.
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, head_dim=16, global_head_dim=32,
        attention_k_eq_v=True, num_global_key_value_heads=1, sliding_window=8, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128, num_kv_shared_layers=2, use_double_wide_mlp=True,
        final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1e4}})),
    # Qwen3.5: Gated DeltaNet layers (2 q/k heads of 8 for 4 value heads of 8) beside gated full attention with
    # RoPE on a quarter of each 16-wide head; the MoE one with a gated shared expert in every layer.
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(QWEN3_5, tie_word_embeddings=False)),
    "qwen3_5-moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        QWEN3_5, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=56,
        output_router_logits=True, router_aux_loss_coef=0.1)),
}


def make_hf(kind, directory, dtype=torch.float32, vocab_size=BASE["vocab_size"], **save_kwargs):
    config_cls, model_cls, extra = FAMILIES[kind]
    if "vocab_size_per_layer_input" in extra:  # Gemma 4's per-layer table has a row for every token
        extra = {**extra, "vocab_size_per_layer_input": vocab_size}
    config = getattr(transformers, config_cls)(**{**BASE, "vocab_size": vocab_size, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "bias" in name or "norm" in name else 0.05))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):  # Gemma 4's (a buffer: saved, loaded, never trained)
                b.add_(torch.randn_like(b) * 0.3)
    model = model.to(dtype)
    model.save_pretrained(directory, **save_kwargs)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def import_model(directory, mesh_shape=(2, 2, 2), expert=1, grad_accum_steps=1, **overrides):
    """(trainer, config, params) of an HF directory on a (data, fsdp, tensor) mesh of that many devices.
    Every mesh compiles with the same XLA options, the one-device default (no YNN fusion; the trainer's
    default for several CPU devices keeps it and adds oneDNN), so a comparison between meshes sees the
    sharding and not XLA:CPU's fusions, whose float32 sums in another order moved one Gemma 4 gradient by
    4e-5 of its tensor's largest."""
    cfg = config_from_hf(directory, **overrides)
    devices = jax.devices()[:int(np.prod(mesh_shape)) * expert]
    trainer = SFTTrainer(Decoder(cfg), optax.sgd(0.1), mesh=make_mesh(*mesh_shape, devices=devices, expert=expert),
                         grad_accum_steps=grad_accum_steps, compiler_options=dict(CPU_COMPILER_OPTIONS))
    abstract = trainer.abstract_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    return trainer, cfg, load_params(directory, cfg, abstract.params)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_import_matches_transformers_and_export_reloads(kind, tmp_path):
    model = make_hf(kind, tmp_path / "hf")
    trainer, cfg, params = import_model(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, 128, (2, 24))
    ours = np.asarray(jax.jit(trainer.model.apply)({"params": params}, ids.astype(np.int32)))
    assert np.abs(ours - hf_logits(model, ids)).max() <= 1e-4
    model_type = json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"]
    save_pretrained(params, cfg, tmp_path / "out", model_type=model_type)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    reloaded.eval()
    assert type(reloaded).__name__ == FAMILIES[kind][1]
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # exactly the family's tensors
    assert np.abs(hf_logits(reloaded, ids) - ours).max() <= 1e-4


def assert_packed_rows_match(model, trainer, params, rng):
    """A row packing 9 and 12 tokens (then 3 of padding) gives each segment the logits of its own HF forward."""
    a, b = rng.integers(0, 128, 9), rng.integers(0, 128, 12)
    packed = np.zeros((1, 24), np.int32)
    packed[0, :9], packed[0, 9:21] = a, b
    segments = np.array([[1] * 9 + [2] * 12 + [0] * 3], np.int32)
    positions = np.array([list(range(9)) + list(range(12)) + [0] * 3], np.int32)
    ours = np.asarray(jax.jit(trainer.model.apply)({"params": params}, packed, positions, segments))
    assert np.abs(ours[0, :9] - hf_logits(model, a[None])[0]).max() <= 1e-4
    assert np.abs(ours[0, 9:21] - hf_logits(model, b[None])[0]).max() <= 1e-4


def test_packed_segments_match_two_separate_hf_forwards(tmp_path):
    model = make_hf("llama-gqa-untied", tmp_path / "hf")
    trainer, _, params = import_model(tmp_path / "hf")
    assert_packed_rows_match(model, trainer, params, np.random.default_rng(1))


def test_sharded_index_bfloat16_and_scanned_import(tmp_path):
    model = make_hf("qwen2-bias-tied", tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ids = np.random.default_rng(2).integers(0, 128, (2, 16))
    reference = hf_logits(model.float(), ids)  # the bf16 weights, computed in float32
    for scan in (False, True):
        trainer, cfg, params = import_model(tmp_path / "hf", (1, 8, 1), scan_layers=scan, param_dtype="float32")
        ours = np.asarray(jax.jit(trainer.model.apply)({"params": params}, ids.astype(np.int32)))
        assert np.abs(ours - reference).max() <= 1e-4
    save_pretrained(params, cfg, tmp_path / "out", model_type="qwen2", dtype="bfloat16", max_shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert np.abs(hf_logits(reloaded.float(), ids) - reference).max() <= 1e-4


def test_errors_name_the_tensor_and_both_shapes(tmp_path):
    make_hf("llama-gqa-untied", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\) in the "
                                         r"checkpoint, but the model expects \(64, 80\)"):
        import_model(tmp_path / "hf")
    config["model_type"] = "gpt2"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        config_from_hf(tmp_path / "hf")


@pytest.mark.slow
def test_fine_tune_a_local_hf_directory_and_export_it(tmp_path):
    import subprocess
    import sys

    from data_fixtures import write_hf_tokenizer

    hf_dir = tmp_path / "hf"
    config = transformers.LlamaConfig(**{**BASE, "vocab_size": 320}, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    write_hf_tokenizer(hf_dir)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                                     {"role": "assistant", "content": "the cat sat"}]}) + "\n"
                            for i in range(32)))
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "sft_sharded.cli"]
    train = subprocess.run([*cli, "train", f"run_dir={run}", f"model.path={hf_dir}", f"data.path={data}",
                            f"data.eval_path={data}", "steps=5", "data.batch_size=8", "data.max_length=64",
                            "eval.every=0", "eval.num_generate=4", "optim.lr=1e-2"], capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-3000:]
    export = subprocess.run([*cli, "export", "--to", "hf", str(run), str(tmp_path / "out")], capture_output=True,
                            text=True)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "tokenizer_config.json").exists()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = np.random.default_rng(3).integers(0, 320, (1, 12))
    assert np.abs(hf_logits(tuned, ids) - hf_logits(original, ids)).max() > 1e-3  # it did train
    from sft_sharded.rundir.checkpoint import load_params as load_final

    trainer, _, imported = import_model(hf_dir, (2, 2, 2))
    params = load_final(run, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                          imported))
    ours = np.asarray(jax.jit(trainer.model.apply)({"params": params}, ids.astype(np.int32)))
    assert np.abs(hf_logits(tuned, ids) - ours).max() <= 1e-4


def test_fields_that_change_the_math_are_refused_by_name(tmp_path):
    make_hf("llama-gqa-untied", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for field, value, message in (
        ("hidden_act", "gelu", r'hidden_act="gelu" is not supported'),
        ("attention_dropout", 0.1, r"attention_dropout=0.1 is not supported: dropout is not implemented"),
        ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, r"dynamic NTK scaling changes the frequencies"),
        ("rope_scaling", {"rope_type": "longrope", "factor": 2.0}, r"rope scaling type 'longrope' is not implemented"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 2.0, "beta": 3}, r"unknown \['beta'\]"),
        ("model_type", "gemma3", r"model_type 'gemma3' needs a text_config"),
        ("model_type", "gpt2", r"model_type 'gpt2' is not supported"),
        ("quantization_config", {"quant_method": "bitsandbytes"}, r"quantization_config=.* is not supported"),
    ):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(UserError, match=message):
            config_from_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "logit_scale": 2.0}))
    with pytest.warns(UserWarning, match=r"fields \['logit_scale'\] are not read by model_type 'llama'"):
        config_from_hf(tmp_path / "hf")


def test_every_checkpoint_tensor_is_used_and_every_param_filled(tmp_path):
    from sft_sharded.hf.weights import SafetensorsDir, write_safetensors

    make_hf("llama-gqa-untied", tmp_path / "hf")
    tensors = SafetensorsDir(tmp_path / "hf")
    arrays = {name: np.array(tensors.get(name)) for name in tensors.entries}
    extra = {**arrays, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}
    write_safetensors(tmp_path / "hf" / "model.safetensors", extra)
    with pytest.raises(UserError, match=r"1 tensor\(s\) in the checkpoint are not part of this model and would be "
                                        r"ignored: 'model.layers.0.self_attn.o_proj.bias'"):
        import_model(tmp_path / "hf")
    del arrays["model.layers.1.mlp.down_proj.weight"]
    write_safetensors(tmp_path / "hf" / "model.safetensors", arrays)
    with pytest.raises(UserError, match=r"lacks 1 tensor\(s\) this config needs: 'model.layers.1.mlp.down_proj.weight'"):
        import_model(tmp_path / "hf")


def test_export_carries_token_ids_positions_and_generation_config(tmp_path):
    make_hf("llama-tied-rope-scaling", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(bos_token_id=5, eos_token_id=[6, 7], pad_token_id=0, max_position_embeddings=48)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [6, 7], "temperature": 0.6}))
    from sft_sharded.rundir.trained import export

    cfg = config_from_hf(tmp_path / "hf")
    trainer, _, params = import_model(tmp_path / "hf")
    from sft_sharded.rundir.checkpoint import save_params

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"model:\n  path: {tmp_path / 'hf'}\nmesh: {{data: 2, fsdp: 2, tensor: 2}}\n"
                                     "data: {batch_size: 8, max_length: 16}\n")
    save_params(run, params)
    export(run, tmp_path / "out")
    out = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert (out.bos_token_id, out.eos_token_id, out.pad_token_id, out.max_position_embeddings) == (5, [6, 7], 0, 48)
    scaling = json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]
    assert scaling["original_max_position_embeddings"] == 16 and isinstance(scaling["original_max_position_embeddings"], int)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert generation.eos_token_id == [6, 7] and generation.temperature == 0.6
    assert cfg.max_position_embeddings == 48


def test_a_preset_export_stops_transformers_generate_at_the_turn_end(tmp_path):
    from sft_sharded.data.tokenizers import ByteTokenizer
    from sft_sharded.hf.weights import tokenizer_token_ids
    from sft_sharded.models import preset

    cfg = preset("tiny", num_layers=1)
    trainer = SFTTrainer(Decoder(cfg), optax.sgd(0.1), mesh=make_mesh(1, 8, 1))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 8), jnp.int32))
    tok = ByteTokenizer()
    save_pretrained(state.params, cfg, tmp_path / "out", token_ids=tokenizer_token_ids(tok))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    end = tok.special_ids["<|end|>"]
    assert model.generation_config.eos_token_id == [tok.eos_id, end]
    assert model.config.max_position_embeddings == cfg.max_position_embeddings
    # Make the model always predict <|end|>: layers add nothing, every embedding is the same vector, and
    # only <|end|>'s output row points along it. An export without stop ids would generate 8 tokens.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[end] = 1.0
        out = model.generate(torch.tensor([[1, 50, 60]]), max_new_tokens=8, do_sample=False)
    assert out[0, 3:].tolist() == [end]


def test_olmo3_published_rope_fields_read_as_transformers_reads_them(tmp_path):
    """Olmo-3-7B's config.json has rope_theta and rope_scaling at the top: transformers scales the full
    layers only and gives the sliding ones its default base. A flat rope_parameters is refused (transformers
    would ignore it)."""
    published = {**BASE, "model_type": "olmo3", "num_hidden_layers": 4, "sliding_window": 8, "rope_theta": 1e4,
                 "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8,
                                  "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.2079441541679836}}
    (tmp_path / "config.json").write_text(json.dumps(published))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    cfg = config_from_hf(tmp_path)
    assert dict(cfg.rope_scaling) == {k: v for k, v in theirs["full_attention"].items() if k != "rope_theta"}
    assert (cfg.rope_theta, cfg.rope_local_theta) == (theirs["full_attention"]["rope_theta"],
                                                       theirs["sliding_attention"]["rope_theta"])
    assert cfg.rope_local_theta != cfg.rope_theta and theirs["sliding_attention"]["rope_type"] == "default"
    flat = {k: v for k, v in published.items() if k not in ("rope_theta", "rope_scaling")}
    (tmp_path / "config.json").write_text(json.dumps({**flat, "rope_parameters": {"rope_type": "default",
                                                                                  "rope_theta": 1e4}}))
    with pytest.raises(UserError, match=r"rope_parameters=.* takes RoPE per layer type"):
        config_from_hf(tmp_path)
