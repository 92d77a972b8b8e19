"""LoRA runs against Hugging Face PEFT: tiny random Llama, Qwen2, OLMo 3, SmolLM3 and Phi-3 LoRA-trained here, exported with
`--to peft` and loaded with `PeftModel.from_pretrained`, give our logits; `--to hf` gives them in plain
transformers; `lora.init_from` continues from the exported adapter; resume checks the base."""

import json

import jax
import numpy as np
import pytest
from data_fixtures import write_hf_tokenizer
from optional import optional
from test_hf import hf_logits, make_hf

from sft_sharded import run, state
from sft_sharded.rundir.checkpoint import load_params
from sft_sharded.cli import main
from sft_sharded.config import load_config
from sft_sharded.trainers import partition

peft = optional("peft")
torch = optional("torch")
transformers = optional("transformers")

ARGS = ["simulate_devices=0", "steps=4", "log_every=1", "eval.every=0", "eval.num_generate=2", "data.batch_size=8",
        "data.max_length=24", "optim.lr=5e-2", "optim.warmup_steps=0", "lora.rank=4", "lora.alpha=8",
        "lora.base_dtype=float32"]


def ours(run_dir, ids):
    """Our logits for a trained LoRA run (adapters on the base read again from model.path)."""
    cfg = load_config(run_dir / "config.yaml")
    trainer = run.build_trainer(cfg)
    abstract = state.abstract_state(trainer, cfg)
    adapters = load_params(run_dir, abstract.params)
    params = partition.merge(adapters, state.frozen_base(trainer, cfg))
    return np.asarray(jax.jit(trainer.model.apply)({"params": params}, ids.astype(np.int32)))


def chats(path, n=16):
    path.write_text("".join(json.dumps({"text": f"hello {i} " * 3}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("kind", ["llama-gqa-untied", "qwen2-bias-tied"])
def test_peft_and_merged_exports_give_our_logits(tmp_path, kind):
    base = make_hf(kind, tmp_path / "hf", vocab_size=320)
    write_hf_tokenizer(tmp_path / "hf")
    data = chats(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    assert main(["train", *ARGS, f"run_dir={run}", f"model.path={tmp_path / 'hf'}", f"data.path={data}",
                 f"data.eval_path={data}"]) == 0
    ids = np.random.default_rng(0).integers(0, 320, (2, 12))
    want = ours(run, ids)
    assert np.abs(want - hf_logits(base, ids)).max() > 1e-3  # the adapters did train

    assert main(["export", "--to", "peft", str(run), str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(tmp_path / "hf")
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    lora_modules = [n for n, _ in tuned.named_parameters() if "lora_" in n]
    assert len(lora_modules) == 2 * 7 * 2  # A and B of 7 projections in 2 layers: PEFT's count for these targets
    np.testing.assert_allclose(hf_logits(tuned, ids), want, atol=1e-4)

    assert main(["export", "--to", "hf", str(run), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, ids), want, atol=1e-4)

    # continue from the exported adapter: step 0 of the new run is the tuned model
    again = tmp_path / "again"
    assert main(["train", *ARGS, "steps=1", "optim.lr=1e-9", f"run_dir={again}", f"model.path={tmp_path / 'hf'}",
                 f"data.path={data}", f"data.eval_path={data}", f"lora.init_from={tmp_path / 'adapter'}"]) == 0
    np.testing.assert_allclose(ours(again, ids), want, atol=1e-4)


def test_resume_refuses_another_base_and_the_checkpoint_holds_no_base(tmp_path, capsys):
    make_hf("llama-gqa-untied", tmp_path / "hf", vocab_size=320)
    write_hf_tokenizer(tmp_path / "hf")
    data = chats(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    common = [*ARGS, f"run_dir={run}", f"data.path={data}", f"data.eval_path={data}", "checkpoint.every=2",
              "checkpoint.async_save=false"]
    assert main(["train", *common, f"model.path={tmp_path / 'hf'}"]) == 0
    meta = (run / "checkpoints" / "4" / "state" / "_METADATA").read_text()
    assert "lora_a" in meta and "wq" not in meta  # adapters and their optimizer state only, no base weight
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert main(["train", *common, "steps=6", f"model.path={tmp_path / 'hf'}"]) == 2
    err = capsys.readouterr().err
    assert "trained LoRA adapters on the base" in err and "use the same model.path" in err


@pytest.mark.parametrize("kind", ["olmo3", "smollm3", "phi3", "gemma4", "qwen3_5"])
def test_lora_on_attention_of_the_late_2026_families(tmp_path, kind, capsys):
    """LoRA on q, k, v and o: the PEFT adapter gives our logits in transformers (OLMo's q/k norm over all
    heads comes after the adapted projection; SmolLM3 has layers without RoPE; Qwen3.5 adapts its gated
    q_proj, query and gate rows alike, and leaves its linear-attention layers alone); Phi-3 fuses q, k and v into
    one module, so its PEFT export is refused by name and the merged export carries the adapters."""
    base = make_hf(kind, tmp_path / "hf", vocab_size=320)
    write_hf_tokenizer(tmp_path / "hf")
    data = chats(tmp_path / "d.jsonl")
    run_dir = tmp_path / "run"
    assert main(["train", *ARGS, "lora.targets=[q,k,v,o]", f"run_dir={run_dir}", f"model.path={tmp_path / 'hf'}",
                 f"data.path={data}", f"data.eval_path={data}"]) == 0
    ids = np.random.default_rng(0).integers(0, 320, (2, 12))
    want = ours(run_dir, ids)
    assert np.abs(want - hf_logits(base, ids)).max() > 1e-3  # the adapters did train
    code = main(["export", "--to", "peft", str(run_dir), str(tmp_path / "adapter")])
    if kind == "phi3":
        assert code == 2 and "export --to peft is not implemented for model_type 'phi3'" in capsys.readouterr().err
    else:
        assert code == 0
        tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        np.testing.assert_allclose(hf_logits(tuned, ids), want, atol=1e-4)
    assert main(["export", "--to", "hf", str(run_dir), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, ids), want, atol=1e-4)
