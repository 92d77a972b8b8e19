"""The main job end to end, in a subprocess exactly as a user runs it."""

import json
import os
import subprocess
import sys

import pytest
import yaml


def run_cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "sft_sharded.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_the_commands_the_tests_start_compile_with_xla_defaults_and_their_own_cache():
    """The test process compiles at a lower optimization level (conftest.py); what it starts must not."""
    import conftest
    import jax

    if not conftest.ON_CPU:
        pytest.skip("the compile flags are set on the CPU platform only")
    assert not any(flag in os.environ["XLA_FLAGS"] for flag in conftest.FAST_COMPILE_FLAGS), os.environ["XLA_FLAGS"]
    assert jax.config.jax_compilation_cache_dir != os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.mark.slow
def test_train_writes_run_dir_and_the_loss_falls(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", f"run_dir={run_dir}", "steps=60", "log_every=10", "eval.every=30",
                     "eval.num_generate=16", "data.num_eval=32", "checkpoint.every=40", "lora.alpha=8")
    assert result.returncode == 0, result.stderr
    assert "LoRA is off (lora.rank=0: every weight trains); lora.alpha is set and not used" in result.stdout
    assert f"step 40: checkpoint {run_dir / 'checkpoints'}/40 (training waited " in result.stdout
    assert "s; written in the background)" in result.stdout
    assert "trained 60 steps (1-60) in " in result.stdout
    assert "8 cpu devices, mesh {'data': 2, 'fsdp': 2, 'expert': 1, 'context': 1, 'tensor': 2}" in result.stdout
    assert "10,000 records scanned: 10,000 kept, 0 truncated" in result.stdout
    assert "held-out exact match (greedy generation):" in result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and "tokens_per_sec" in r]
    assert records[0]["step"] == 1 and records[0]["compile_and_first_step_s"] > 0 and records[0]["loss"] > 0
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in evals] == [30, 60]
    assert all(r["tokens_per_sec"] > 0 and r["num_tokens"] > 0 for r in train)
    assert all(r["model_tflops_per_sec_per_device"] > 0 for r in train)
    assert not any("mfu" in r or "mfu_real_tokens" in r for r in records)  # no peak is known for a CPU: absent
    assert all(0.8 < r["packing_efficiency"] <= 1.0 for r in train)
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert 0.0 <= records[-1]["eval_exact_match"] <= 1.0 and records[-1]["eval_generated"] == 16
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["step_30.jsonl", "step_60.jsonl"]  # one per eval
    assert evals[0]["eval_generated"] == 16 and 0.0 <= evals[0]["eval_exact_match"] <= 1.0
    scored = [json.loads(line) for line in (run_dir / "eval" / "step_60.jsonl").read_text().splitlines()]
    assert len(scored) == 16 and all(set(r) == {"prompt", "reference", "generation"} and r["prompt"] for r in scored)
    assert sum(r["reference"] == r["generation"] for r in scored) / 16 == records[-1]["eval_exact_match"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 60
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run_dir / "tensorboard").iterdir())
    gen = run_cli("generate", "--run-dir", str(run_dir), "--prompt", "rev:1234", "--prompt", "sort:4321",
                  "--max-new-tokens", "8")
    assert gen.returncode == 0, gen.stderr
    lines = gen.stdout.strip().splitlines()
    assert lines[0].startswith("rev:1234 -> ") and lines[1].startswith("sort:4321 -> ")


def test_train_on_a_jsonl_file_with_a_hf_tokenizer(tmp_path):
    from data_fixtures import write_hf_tokenizer

    tok_dir = write_hf_tokenizer(tmp_path / "tok")
    data = tmp_path / "chats.jsonl"
    chats = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "the cat"}]}
             for i in range(40)]
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    result = run_cli("train", f"run_dir={tmp_path / 'run'}", "steps=4", "log_every=2", f"data.path={data}",
                     f"data.eval_path={data}", "data.format=messages", f"tokenizer.path={tok_dir}", "data.max_length=64",
                     "data.batch_size=8", "eval.num_generate=8", "eval.every=0", "mesh.fsdp=-1", "mesh.data=1",
                     "mesh.tensor=1")
    assert result.returncode == 0, result.stderr
    assert "40 records scanned (all): 40 kept" in result.stdout


def test_config_errors_exit_2_with_the_key():
    result = run_cli("train", "optim.lrr=0.1")
    assert result.returncode == 2
    assert "unknown config key 'optim.lrr'; did you mean optim.lr" in result.stderr


def test_progress_prints_plain_lines_off_a_terminal_and_drives_a_rich_bar_on_one(capsys):
    from sft_sharded.cli import Progress
    from sft_sharded.config import TrainConfig

    cfg = TrainConfig(steps=10)
    first = {"step": 1, "loss": 2.0, "compile_and_first_step_s": 3.0}
    timed = {"step": 4, "loss": 1.5, "accuracy": 0.25, "tokens_per_sec": 1234.0, "step_time_s": 0.5,
             "mfu": 0.42}
    plain = Progress(cfg, enabled=True, interactive=False)
    for record in (first, timed, {**timed, "step": 6, "mfu": float("nan")}, {"step": 6, "eval_loss": 1.0}):
        plain.record(record)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 1: loss 2.0000, compiled and ran in 3.0s",
                     "step     4/10  loss 1.5000  acc 25.00%  1,234 tok/s  MFU 42.0%  eta 0m03s",
                     "step     6/10  loss 1.5000  acc 25.00%  1,234 tok/s  eta 0m02s",  # no peak known: no MFU
                     "step     6  eval loss 1.0000  held-out token accuracy nan%"]
    bar = Progress(cfg, enabled=True, interactive=True)
    bar.record(timed)
    task = bar.bar.tasks[0]
    assert task.completed == 4 and task.total == 10 and "MFU 42.0%" in task.fields["stats"]
    bar.close()
    capsys.readouterr()
    silent = Progress(cfg, enabled=False, interactive=True)  # another process than 0: prints nothing
    silent.record(timed)
    silent.say("hello")
    assert capsys.readouterr().out == ""


def test_a_lora_run_evaluates_generates_and_resumes_on_the_built_in_task(tmp_path, capsys):
    from sft_sharded.cli import main

    run = tmp_path / "run"
    args = ["train", "simulate_devices=0", f"run_dir={run}", "steps=4", "log_every=2", "eval.every=0",
            "eval.num_generate=4", "data.num_eval=8", "lora.rank=4", "checkpoint.every=2", "checkpoint.async_save=false",
            "data.check_records=100"]
    assert main([*args[:4], "steps=2", *args[5:]]) == 0
    assert main(args) == 0  # resumes at step 2 on the re-initialised base
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints'}/2" in out and "held-out exact match (greedy generation)" in out
    # the tiny preset's adapter count, written out from its shape (d 128, 4 layers, heads 4 x 32,
    # kv 2 x 32, mlp 384): rank 4 x sum of (in + out) over the 7 targets, per layer
    adapters = 4 * 4 * ((128 + 128) + 2 * (128 + 64) + (128 + 128) + 2 * (128 + 384) + (384 + 128))
    assert f"model: 0.89M frozen params + {adapters / 1e6:.2f}M trained LoRA params on 8 cpu devices" in out
    assert "trained 2 steps (3-4) in " in out
    assert main(["generate", "--run-dir", str(run), "--prompt", "rev:123", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("rev:123 -> ")
