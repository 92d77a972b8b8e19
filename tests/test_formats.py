"""Golden token/mask vectors for each format, with the byte tokenizer and a tiny real tokenizer.json."""

import json

import numpy as np
import pytest
from data_fixtures import CHATML, write_hf_tokenizer
from tokenizers import Tokenizer

from sft_sharded.data.formats import RecordError, RowSkipped, encode_record, fit_length
from sft_sharded.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer
from sft_sharded.errors import UserError

B = ByteTokenizer()  # specials: pad 0, bos 1, eos 2, <|system|> 3, <|user|> 4, <|assistant|> 5, <|end|> 6


def ids(text):  # bytes shifted by the 8 special ids, written out independently of the tokenizer
    return [b + 8 for b in text.encode()]


def test_text_golden_byte():
    ex = encode_record({"text": "hi"}, B)
    assert ex.tokens.tolist() == [1, 104 + 8, 105 + 8, 2]
    assert ex.mask.tolist() == [False, True, True, True]  # BOS is context; EOS is trained


def test_prompt_completion_golden_byte():
    ex = encode_record({"prompt": "a=", "completion": "b"}, B)
    assert ex.tokens.tolist() == [1, *ids("a="), *ids("b"), 2]
    assert ex.mask.tolist() == [False, False, False, True, True]
    everything = encode_record({"prompt": "a=", "completion": "b"}, B, train_on_prompt=True)
    assert everything.mask.tolist() == [False, True, True, True, True]


def test_messages_golden_byte():
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}, {"role": "user", "content": "r"},
                           {"role": "assistant", "content": "bc"}]}
    ex = encode_record(record, B)
    assert ex.tokens.tolist() == [3, *ids("s"), 6, 4, *ids("q"), 6, 5, *ids("a"), 6, 4, *ids("r"), 6, 5, *ids("bc"), 6]
    expected = [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]  # assistant content and its <|end|>
    assert ex.mask.astype(int).tolist() == expected
    assert encode_record(record, B, train_on_prompt=True).mask[1:].all()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_tokenizer(tmp_path_factory.mktemp("tok"))


def test_hf_tokenizer_formats_against_the_raw_library(hf_dir):
    tok = HFTokenizer(hf_dir)
    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    enc = lambda s: raw.encode(s, add_special_tokens=False).ids  # noqa: E731
    bos, eos = raw.token_to_id("<s>"), raw.token_to_id("</s>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eos, eos)
    ex = encode_record({"prompt": "hello world", "completion": " the cat"}, tok)
    assert ex.tokens.tolist() == [bos, *enc("hello world"), *enc(" the cat"), eos]
    n_prompt = 1 + len(enc("hello world"))
    assert ex.mask.tolist() == [False] * n_prompt + [True] * (len(enc(" the cat")) + 1)
    text = encode_record({"text": "the mat"}, tok)
    assert text.tokens.tolist() == [bos, *enc("the mat"), eos]
    chat = encode_record({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat"}]}, tok)
    prefix = enc("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    answer = enc("the cat<|im_end|>")
    assert chat.tokens.tolist() == prefix + answer + enc("\n")
    assert chat.mask.tolist() == [False] * len(prefix) + [True] * len(answer) + [False]


def test_template_without_generation_markers_gives_the_same_mask(hf_dir):
    tok = HFTokenizer(hf_dir)
    plain = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                           {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "sort 3 1 2"},
                           {"role": "assistant", "content": "1 2 3"}]}
    marked = encode_record(record, tok)
    tok.chat_template = plain
    unmarked = encode_record(record, tok)
    assert unmarked.tokens.tolist() == marked.tokens.tolist()
    assert unmarked.mask.tolist() == marked.mask.tolist() and marked.mask.sum() > 4
    B2 = ByteTokenizer()
    B2.chat_template = B2.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert encode_record(record, B2).mask.tolist() == encode_record(record, B).mask.tolist()


def test_pad_equal_to_eos_does_not_mask_the_real_eos(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert tok.pad_id == tok.eos_id
    ex = encode_record({"prompt": "hello", "completion": " world"}, tok)
    assert ex.tokens[-1] == tok.eos_id and ex.mask[-1]


def test_sandbox_blocks_python_internals():
    tok = ByteTokenizer()
    tok.chat_template = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(RecordError, match="stopped by the sandbox.*'__class__'"):  # a broken template stops the run
        encode_record({"messages": [{"role": "assistant", "content": "x"}]}, tok)


def test_empty_assistant_mask_is_a_row_error_not_a_silent_mask():
    tok = ByteTokenizer()
    tok.chat_template = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(RowSkipped, match="assistant mask is empty"):
        encode_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, tok)


@pytest.mark.parametrize("record, message", [
    ({"foo": 1}, r"f.jsonl:3: no known format in keys \['foo'\]"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"f.jsonl:3: messages\[0\] has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 5}]}, r"f.jsonl:3: messages\[0\].content must be a string or a list of text parts, got int"),
    ({"text": ["a"]}, r"f.jsonl:3: 'text' must be a string, got list"),
    ([1, 2], r"f.jsonl:3: a record must be a JSON object"),
])
def test_bad_records_name_file_and_line(record, message):
    with pytest.raises(RecordError, match=message):
        encode_record(record, B, where="f.jsonl:3")


def test_tokenizer_directory_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text(json.dumps({}))  # present but not a tokenizer: the library says so
    with pytest.raises(UserError, match="tokenizer.json: not a tokenizer the tokenizers library can read"):
        load_tokenizer(str(tmp_path))


def test_truncation_and_drop_policies():
    ex = encode_record({"prompt": "abcdef", "completion": "xy"}, B)  # 10 tokens, 9 positions
    assert fit_length(ex, 9, "drop") is ex
    assert fit_length(ex, 8, "drop") is None
    cut = fit_length(ex, 8, "truncate")
    assert cut.truncated and len(cut.tokens) == 9 and cut.mask.tolist() == ex.mask[:9].tolist()
    assert fit_length(ex, 6, "truncate") is None  # only prompt left: no trained token, dropped
    np.testing.assert_array_equal(ex.tokens[:7], ids("abcdef") and [1, *ids("abcdef")])


def test_byte_decode_stops_at_a_stop_id_and_marks_ids_past_its_vocabulary():
    tok = ByteTokenizer()
    ids = tok.encode("hi")[0]
    assert tok.decode([*ids, 300, tok.eos_id, *ids]) == "hi\ufffd"


def test_sharegpt_columns_train_like_the_same_chat_in_our_format(tmp_path):
    """data.columns maps ShareGPT's conversations/from/value (and its speaker names) onto ours: the
    pipeline's rows equal those of the same conversations written in our format."""
    import dataclasses
    import json

    from sft_sharded.config import load_config
    from sft_sharded.data.pipeline import make_iterator
    from sft_sharded.data.tokenizers import ByteTokenizer

    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "sharegpt.jsonl"
    chats = [[("system", "be brief"), ("user", "sort 3 1 2"), ("assistant", "1 2 3")],
             [("user", "reverse ab"), ("assistant", "ba"), ("user", "again"), ("assistant", "ab")]]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    ours.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n"
                            for chat in chats))
    theirs.write_text("".join(json.dumps({"id": i, "conversations": [{"from": names[r], "value": c} for r, c in chat]})
                              + "\n" for i, chat in enumerate(chats)))
    base = load_config(None, ["data.batch_size=2", "data.max_length=64", "data.packing=false"]).data
    rows = []
    for path, columns in ((ours, None), (theirs, {"conversations": "messages", "from": "role", "value": "content"})):
        batch = next(make_iterator(dataclasses.replace(base, path=str(path), columns=columns), ByteTokenizer(), seed=0))
        rows.append(batch)
    assert rows[0]["loss_mask"].sum() > 0
    for key in rows[0]:
        np.testing.assert_array_equal(rows[1][key], rows[0][key])
