"""`sft-sharded data`: the report, then records with the trained tokens in [[...]] (and a weight other than
1 after them), refused records with their reason, and --json with tokens, text pieces and weights."""

import json

from data_fixtures import write_hf_tokenizer

from sft_sharded.cli import main
from sft_sharded.data.tokenizers import ByteTokenizer
from sft_sharded.data.view import token_pieces

RAISES = "{{ raise_exception('only user turns please') }}"


def _data(tmp_path):
    records = [{"messages": [{"role": "user", "content": "rev:123"}, {"role": "assistant", "content": "321"}]},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0.5},
                             {"role": "user", "content": "más"}, {"role": "assistant", "content": "ok"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_data_shows_the_report_and_the_trained_tokens_of_each_record(tmp_path, capsys):
    assert main(["data", f"data.path={_data(tmp_path)}", "--records", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("data: 2 records scanned (all): 2 kept")
    assert "<|user|>rev:123<|end|><|assistant|>[[321<|end|>]]" in out
    assert "<|user|>hi<|end|><|assistant|>[[yo<|end|>]]x0.5<|user|>más<|end|><|assistant|>[[ok<|end|>]]" in out


def test_data_json_has_tokens_pieces_and_weights(tmp_path, capsys):
    assert main(["data", f"data.path={_data(tmp_path)}", "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    example = out["records"][1]["examples"][0]
    assert "".join(example["pieces"]) == "<|user|>hi<|end|><|assistant|>yo<|end|><|user|>más<|end|><|assistant|>ok<|end|>"
    assert example["tokens"] == ByteTokenizer().encode("".join(example["pieces"]))[0]
    trained = [(p, w) for p, w in zip(example["pieces"], example["weights"]) if w]
    assert trained == [("y", 0.5), ("o", 0.5), ("<|end|>", 0.5), ("o", 1.0), ("k", 1.0), ("<|end|>", 1.0)]


def test_a_template_that_raises_on_every_record_is_one_line_per_cause(tmp_path, capsys):
    tok = write_hf_tokenizer(tmp_path / "tok", RAISES)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n" + json.dumps({"text": "plain text trains"}) + "\n")
    assert main(["data", f"data.path={path}", f"tokenizer.path={tok}", "--records", "1"]) == 0
    out, err = capsys.readouterr()
    assert f"  1 refused: chat template raised: only user turns please (e.g. {path}:1)" in out.splitlines()
    assert f"{path}:1: refused: chat template raised: only user turns please" in out.splitlines()
    assert "WARNING" not in err


def test_token_pieces_give_a_split_character_to_its_last_byte():
    tok = ByteTokenizer()
    ids = tok.encode("é!")[0]  # two byte tokens, then "!"
    assert token_pieces(tok, ids) == ["", "é", "!"]
