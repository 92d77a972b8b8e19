"""The bad-input table: each user mistake gives one line `sft-sharded: error: <place>` and exit status 2
(1 for a diverged run), no traceback, and loses nothing. `main()` runs in this process (jax already has
the 8 simulated devices, so `simulate_devices=0`); three cases run the real command in a subprocess (`test_cli.run_cli`)."""

import json
import os

import jax
import jax.numpy as jnp
import optax
import pytest
from data_fixtures import write_hf_tokenizer
from test_cli import run_cli

from sft_sharded import Decoder, DecoderConfig, SFTTrainer, make_mesh
from sft_sharded.cli import main
from sft_sharded.errors import UserError
from sft_sharded.hf.weights import save_pretrained

# The start-of-run data check reads 100 records, not 10,000: on the built-in task that check would take longer
# than the run's steps (test_cli's first test keeps the default).
FAST = ["simulate_devices=0", "steps=2", "log_every=1", "eval.every=0", "eval.num_generate=2", "data.num_eval=4",
        "data.batch_size=8", "data.max_length=32", "data.check_records=100"]


def cli(capsys, *args):
    """Exit status and stderr of `sft-sharded ARGS` run in this process."""
    status = main(list(args))
    return status, capsys.readouterr().err


def assert_one_line(status, err, expected, code=2):
    lines = [line for line in err.splitlines() if line.startswith("sft-sharded:")]
    assert status == code, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("sft-sharded: error: "), err
    assert expected in lines[0], lines[0]


def jsonl(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("records, expected", [
    ([CHAT, '{"messages": [}'], "bad.jsonl:2: malformed JSON"),
    ([{"prompt": "a", "completion": 5}], "bad.jsonl:1: 'completion' must be a string, got int"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], "bad.jsonl:1: messages[0] has unknown role 'robot'"),
    ([{"question": "x"}], "bad.jsonl:1: no known format in keys ['question']"),
    ([CHAT, '{"text": "caf\xe9"}'], "bad.jsonl:2: not UTF-8 text: byte 14 of the line is b'\\xe9'"),
    ([{"text": "x" * 200}] * 3, "none of the 3 records scanned can be trained on: 3 longer than data.max_length=32"),
])
def test_bad_data_records(tmp_path, capsys, records, expected):
    data = tmp_path / "bad.jsonl"  # written as Latin-1, so a non-ASCII character is a byte that is not UTF-8
    data.write_bytes("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode("latin-1"))
    status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}", f"data.path={data}",
                      f"data.eval_path={data}", "data.truncation=drop")
    assert_one_line(status, err, expected)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written


def test_empty_missing_and_unmatched_data_files(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    for path, expected in ((tmp_path / "empty.jsonl", "empty.jsonl: the file has no records"),
                           (tmp_path / "nope.jsonl", "nope.jsonl' is not a file"),
                           (tmp_path / "*.parquet", "*.parquet' matches no file")):
        status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}", f"data.path={path}")
        assert_one_line(status, err, expected)


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'; did you mean optim.lr"),
    (["optim.lr=fast"], "optim.lr='fast' must be a number"),
    (["mesh.data=3"], "mesh data=3 x fsdp=2 x expert=1 x context=1 x tensor=2 = 12 devices, but 8 devices are available"),
    (["mesh.fsdp=0"], "mesh.fsdp=0: each mesh size must be a positive int or -1"),
    (["data.columns=[from]"], "data.columns=['from'] must be a mapping"),
    (["mesh.data=1", "mesh.tensor=1", "mesh.context=4", "data.max_length=30"],
     "data.max_length=30 is not divisible by mesh.context=4: each row's positions are split between that many devices"),
    (["data.batch_size=6"], "data.batch_size=6 is not divisible by the data-parallel size mesh.data x mesh.fsdp x mesh.expert = 4"),
    (["model.path=/nonexistent"], "model.path='/nonexistent': no config.json in that directory"),
    (["tokenizer.path=/tmp"], "tokenizer.path='/tmp': no tokenizer.json in that directory"),
    (["model.preset=llama9"], "model.preset='llama9' is not one of"),
    (["model.dtype=float99"], "model: data type 'float99' not understood"),
    (["lora.rank=4", "lora.targets=[q, attn_out]"], "lora.targets=['q', 'attn_out']: unknown ['attn_out']"),
    (["lora.rank=4", "lora.dropout=1.5"], "lora.dropout=1.5 must be in [0, 1)"),
    (["model.attention=cudnn"], "model.attention='cudnn' needs a GPU"),  # this suite runs on the CPU
    (["mesh.data=1", "mesh.context=2", "model.attention=splash", "model.context_attention=ring"],
     "model.attention='splash' on a sequence split by mesh.context needs model.context_attention=allgather (got 'ring')"),
])
def test_bad_config(tmp_path, capsys, overrides, expected):
    status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}", *overrides)
    assert_one_line(status, err, expected)


def write_model_dir(directory, vocab=384, hidden=32):
    """A tiny Llama written by our own export (no torch needed)."""
    cfg = DecoderConfig(vocab_size=vocab, hidden_size=hidden, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64,
                      max_position_embeddings=256)
    trainer = SFTTrainer(Decoder(cfg), optax.sgd(0.1), mesh=make_mesh(1, 8, 1))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 8), jnp.int32))
    save_pretrained(state.params, cfg, directory)
    return directory


def test_bad_model_directories(tmp_path, capsys):
    model = write_model_dir(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    run = f"run_dir={tmp_path / 'run'}"

    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert_one_line(*cli(capsys, "train", *FAST, run, f"model.path={model}"), "model_type 'gpt2' is not supported")

    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    assert_one_line(*cli(capsys, "train", *FAST, run, f"model.path={model}"),
                    "tensor 'model.layers.0.mlp.gate_proj.weight' has shape (64, 32) in the checkpoint, but the "
                    "model expects (32, 80)")

    (model / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    assert_one_line(*cli(capsys, "train", *FAST, run, f"model.path={model}"),
                    "the checkpoint lacks 4 tensor(s) this config needs: 'model.layers.0.self_attn.k_proj.bias'")

    (model / "config.json").write_text(json.dumps(config))
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # an interrupted download
    assert_one_line(*cli(capsys, "train", *FAST, run, f"model.path={model}"),
                    f"{model / 'model.safetensors'}: not a complete safetensors file (Error while deserializing "
                    "header: incomplete metadata, file not fully covered; a truncated download?)")

    small = write_model_dir(tmp_path / "small", vocab=64)
    assert_one_line(*cli(capsys, "train", *FAST, run, f"model.path={small}"),
                    "has vocab_size 64, smaller than the tokenizer's 264")


def test_chat_template_that_escapes_the_sandbox(tmp_path, capsys):
    tok = write_hf_tokenizer(tmp_path / "tok", chat_template="{{ messages.__class__.__mro__ }}")
    data = jsonl(tmp_path / "chats.jsonl", CHAT)
    status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}", f"data.path={data}",
                      f"data.eval_path={data}", f"tokenizer.path={tok}")
    assert_one_line(status, err, "chats.jsonl:1: the chat template was stopped by the sandbox")


def test_chat_template_with_a_syntax_error(tmp_path, capsys):
    tok = write_hf_tokenizer(tmp_path / "tok", chat_template="{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    data = jsonl(tmp_path / "chats.jsonl", CHAT)
    status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}", f"data.path={data}",
                      f"data.eval_path={data}", f"tokenizer.path={tok}")
    assert_one_line(status, err, f"the chat template of {tok / 'tokenizer_config.json'}: line 2: unexpected '}}'")
    assert not (tmp_path / "run").exists()


def test_run_dir_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'a_file' / 'run'}")
    assert_one_line(status, err, f"run_dir='{tmp_path / 'a_file' / 'run'}' cannot be written: {tmp_path / 'a_file'} "
                                 "is a file")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # lr 1e30 makes the first update's weights huge; the second step's gradient is NaN.
    run = tmp_path / "run"
    status, err = cli(capsys, "train", *FAST, f"run_dir={run}", "steps=6", "checkpoint.every=1",
                      "optim.lr=1e30", "optim.warmup_steps=0", "checkpoint.async_save=false")
    assert_one_line(status, err, "step 2: the loss is", code=1)
    assert f"the newest checkpoint, {run / 'checkpoints' / '1'}, holds the last good state" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert not (run / "final_params").exists()


def test_checkpoints_of_another_model_are_refused_and_kept(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *FAST, f"run_dir={run}", "checkpoint.every=2", "checkpoint.async_save=false"]) == 0
    before = (run / "config.yaml").read_text()
    model = write_model_dir(tmp_path / "m")
    status, err = cli(capsys, "train", *FAST, f"run_dir={run}", "steps=4", f"model.path={model}")
    assert_one_line(status, err, f"{run / 'checkpoints'}/2 was saved by a different model")
    assert "params/embedding: (384, 128) saved, (384, 32) now" in err
    assert (run / "config.yaml").read_text() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_a_corrupt_newest_checkpoint_is_moved_aside_and_replaced(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *FAST, f"run_dir={run}", "steps=4", "checkpoint.every=2",
                 "checkpoint.async_save=false"]) == 0
    arrays = sorted((p for p in (run / "checkpoints" / "4" / "state").rglob("*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
    arrays[-1].write_bytes(arrays[-1].read_bytes()[: arrays[-1].stat().st_size // 2])  # a truncated array file
    capsys.readouterr()
    # As a user runs it, to the process's exit: each of orbax's failed reads of the truncated file used to
    # print its own traceback on stderr when its task was collected (4,000 to 14,000 lines)
    resume = run_cli("train", *FAST, f"run_dir={run}", "steps=5", "checkpoint.every=2", timeout=300)
    assert resume.returncode == 0 and resume.stderr == "", resume.stderr[-3000:]
    out = resume.stdout
    warnings = [line for line in out.splitlines() if "cannot be restored" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: checkpoint {run / 'checkpoints'}/4 cannot be "
                                                         "restored ("), out
    assert f"moved to {run / 'checkpoints' / 'corrupt-4'}, training resumes from the one before it" in warnings[0]
    assert f"resumed from {run / 'checkpoints'}/2" in out
    assert (run / "checkpoints" / "corrupt-4" / "state").is_dir()  # kept for inspection
    # the re-done step 4 saved a good checkpoint in its place: the next resume starts there, without a warning
    assert main(["train", *FAST, f"run_dir={run}", "steps=6"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints'}/4" in out and "cannot be restored" not in out


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors_too(tmp_path):
    result = run_cli("--debug", "train", "optim.lrr=1", timeout=300)
    status, err = result.returncode, result.stderr
    assert status == 1 and "Traceback" in err and "ConfigError: unknown config key 'optim.lrr'" in err
    with pytest.raises(UserError):
        main(["--debug", "train", "optim.lrr=1"])


def test_the_real_command_prints_one_line_for_a_data_mistake(tmp_path):
    # as a user runs it: no JAX_PLATFORMS (the suite sets it), so jax would also try the libtpu the test extra
    # installs; on this CPU host the command selects the CPU platform first and nothing else is printed
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    data = jsonl(tmp_path / "bad.jsonl", CHAT, "{not json")
    result = run_cli("train", *FAST[1:], f"run_dir={tmp_path / 'run'}", f"data.path={data}",
                     f"data.eval_path={data}", timeout=300, env=env)
    status, err = result.returncode, result.stderr
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"sft-sharded: error: {data}:2: malformed JSON"), err


@pytest.mark.parametrize("args, expected", [
    (["data.columns={conversations: messages"], "data.columns='{conversations: messages': the value line 1, "
                                                "column 25: not valid YAML: expected ',' or '}', but got '<stream end>'"),
    (["--config", "CONFIG"], "config.yaml: line 2, column 14: not valid YAML: mapping values are not allowed here"),
])
def test_yaml_mistakes_are_one_line_naming_the_place(tmp_path, capsys, args, expected):
    config = tmp_path / "config.yaml"
    config.write_text("steps: 3\nmodel: preset: tiny\n")
    status, err = cli(capsys, "train", *[str(config) if a == "CONFIG" else a for a in args])
    assert_one_line(status, err, expected)
