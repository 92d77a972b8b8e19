"""Chat templates of the 2026 families: golden trained-token lists under Gemma's template (no system role:
merged into the first user turn) and a Qwen3-style template that rewrites history (earlier turns lose
their reasoning; only the last turn is wrapped in <think> tags)."""

import json

import pytest
from data_fixtures import write_hf_tokenizer
from optional import optional
from tokenizers import Tokenizer

from sft_sharded.data.formats import RowSkipped, encode_record
from sft_sharded.data.tokenizers import HFTokenizer

# Gemma 3's template, as its tokenizer_config.json has it (text parts only).
GEMMA = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
# Gemma 3's treatment of content parts (its template iterates them and trims each text).
GEMMA_PARTS = (
    "{%- for message in messages -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# Qwen3's rule for reasoning, written for this test: turns after the last user message keep their
# reasoning (the last turn always gets <think> tags), earlier turns are rendered without it.
QWEN3 = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) -%}"
    "{%- for message in messages -%}{%- if message.role == 'user' -%}{%- set ns.last_query_index = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' -%}"
    "{%- set content = message.content -%}"
    "{%- if '</think>' in content -%}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}"
    "{%- else -%}{{ '<|im_start|>assistant\\n' + content }}{%- endif -%}{{ '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _trained(example):
    return [t for t, m in zip(example.tokens.tolist(), example.mask.tolist()) if m]


def test_gemma_template_merges_the_system_turn_and_trains_model_turns(tmp_path):
    directory = write_hf_tokenizer(tmp_path, GEMMA, specials=("<start_of_turn>", "<end_of_turn>"))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    tok = HFTokenizer(directory)
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    enc = lambda s: raw.encode(s, add_special_tokens=False).ids  # noqa: E731
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                           {"role": "assistant", "content": "the cat"}, {"role": "user", "content": "sort 3 1 2"},
                           {"role": "assistant", "content": "1 2 3"}]}
    ex = encode_record(record, tok)
    end = raw.token_to_id("<end_of_turn>")
    assert tok.stop_ids == (2, end)  # <end_of_turn> from generation_config.json: generation stops at the turn end
    assert ex.tokens.tolist()[:len(enc("<s><start_of_turn>user\nbe brief\n\nhello<end_of_turn>\n"))] == enc(
        "<s><start_of_turn>user\nbe brief\n\nhello<end_of_turn>\n")
    assert _trained(ex) == [*enc("the cat"), end, *enc("1 2 3"), end]


def test_qwen3_template_that_drops_earlier_reasoning_trains_the_whole_rendering(tmp_path):
    directory = write_hf_tokenizer(tmp_path, QWEN3, eos_token="<|im_end|>",
                                   specials=("<|im_start|>", "<|im_end|>", "<think>", "</think>"))
    tok = HFTokenizer(directory)
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    enc = lambda s: raw.encode(s, add_special_tokens=False).ids  # noqa: E731
    record = {"messages": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nhello there"},
        {"role": "user", "content": "sort 3 1 2"},
        {"role": "assistant", "content": "<think>\nthe digits in order\n</think>\n\n1 2 3"},
    ]}
    ex = encode_record(record, tok)
    end = raw.token_to_id("<|im_end|>")
    # The first turn as the whole rendering has it (its reasoning gone), the last with its <think> block.
    assert _trained(ex) == [*enc("hello there"), end, *enc("<think>\nthe digits in order\n</think>\n\n1 2 3"), end]
    assert ex.tokens.tolist() == enc(
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>\n<|im_start|>user\n"
        "sort 3 1 2<|im_end|>\n<|im_start|>assistant\n<think>\nthe digits in order\n</think>\n\n1 2 3<|im_end|>\n")


def test_generation_config_eos_outside_the_vocabulary_is_refused(tmp_path):
    directory = write_hf_tokenizer(tmp_path)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 99999]}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id=\[2, 99999\] must be ids"):
        HFTokenizer(directory)


# A Qwen3-style template with tools, written for this test: the tools' schemas in a system block, an
# assistant's calls after its content, tool results as user turns in <tool_response> tags, reasoning kept
# after the last user message.
QWEN3_TOOLS = (
    "{%- if tools -%}{{ '<|im_start|>system\\n<tools>' }}{%- for tool in tools -%}{{ '\\n' + (tool | tojson) }}"
    "{%- endfor -%}{{ '\\n</tools><|im_end|>\\n' }}{%- endif -%}"
    "{%- set ns = namespace(last_query_index=0) -%}"
    "{%- for message in messages -%}{%- if message.role == 'user' -%}{%- set ns.last_query_index = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_query_index and message.reasoning_content -%}"
    "{{ '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif -%}{{ message.content }}"
    "{%- for call in message.tool_calls or [] -%}{{ '<tool_call>\\n' + (call.function | tojson) + '\\n</tool_call>' }}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' -%}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
TOOL_CHAT = {
    "tools": [{"name": "sort", "parameters": {"type": "object"}}],
    "messages": [
        {"role": "user", "content": "sort 3 1 2"},
        {"role": "assistant", "content": None, "reasoning_content": "use the tool",
         "tool_calls": [{"type": "function", "function": {"name": "sort", "arguments": {"xs": [3, 1, 2]}}}]},
        {"role": "tool", "name": "sort", "content": "[1, 2, 3]"},
        {"role": "assistant", "content": "1 2 3", "reasoning_content": "the tool sorted", "weight": 0.5},
    ],
}


def _qwen3_tools(tmp_path):
    directory = write_hf_tokenizer(tmp_path, QWEN3_TOOLS, eos_token="<|im_end|>",
                                   specials=("<|im_start|>", "<|im_end|>", "<think>", "</think>"))
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return HFTokenizer(directory), lambda s: raw.encode(s, add_special_tokens=False).ids, raw.token_to_id("<|im_end|>")


def test_text_parts_reach_the_template_as_a_list_as_in_transformers(tmp_path):
    tok, enc, end = _qwen3_tools(tmp_path)  # a template that adds strings: it cannot take a list
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "sort "}, {"type": "text", "text": "3"}]},
                          {"role": "assistant", "content": "3"}]}
    with pytest.raises(RowSkipped, match="cannot take content as a list of parts: give each message's content as a"):
        encode_record(parts, tok)
    gemma = write_hf_tokenizer(tmp_path / "gemma", GEMMA_PARTS, specials=("<start_of_turn>", "<end_of_turn>"))
    ex = encode_record(parts, HFTokenizer(gemma))  # Gemma's own template iterates the parts
    raw = Tokenizer.from_file(str(gemma / "tokenizer.json"))
    assert _trained(ex) == [*raw.encode("3", add_special_tokens=False).ids, raw.token_to_id("<end_of_turn>")]


def test_tool_calls_tools_reasoning_and_text_parts_reach_the_template_and_weights_the_loss(tmp_path):
    tok, enc, end = _qwen3_tools(tmp_path)
    ex = encode_record(TOOL_CHAT, tok)
    call = '<tool_call>\n{"name": "sort", "arguments": {"xs": [3, 1, 2]}}\n</tool_call>'
    assert ex.tokens.tolist() == enc(
        '<|im_start|>system\n<tools>\n{"name": "sort", "parameters": {"type": "object"}}\n</tools><|im_end|>\n'
        "<|im_start|>user\nsort 3 1 2<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\nuse the tool\n</think>\n\n{call}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n[1, 2, 3]\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nthe tool sorted\n</think>\n\n1 2 3<|im_end|>\n")
    first = [*enc(f"<think>\nuse the tool\n</think>\n\n{call}"), end]
    last = [*enc("<think>\nthe tool sorted\n</think>\n\n1 2 3"), end]
    trained = [(t, float(w)) for t, w in zip(ex.tokens.tolist(), ex.target_weights().tolist()) if w]
    assert trained == [(t, 1.0) for t in first] + [(t, 0.5) for t in last]  # the tool's result is never trained


# ChatML with {% generation %} markers around each assistant turn's content and turn end.
MARKED = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.role == 'assistant' -%}{% generation %}{{ message.content + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{%- else -%}{{ message.content + '<|im_end|>\\n' }}{%- endif -%}{%- endfor -%}"
)


def test_per_message_train_and_weight_under_generation_markers(tmp_path):
    directory = write_hf_tokenizer(tmp_path, MARKED)
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    enc = lambda s: raw.encode(s, add_special_tokens=False).ids  # noqa: E731
    end = raw.token_to_id("<|im_end|>")
    record = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat", "train": False},
                           {"role": "user", "content": "sort 3 1 2"}, {"role": "assistant", "content": "1 2 3", "weight": 2.0},
                           {"role": "user", "content": "again"}, {"role": "assistant", "content": "1 2 3"}]}
    ex = encode_record(record, HFTokenizer(directory))
    trained = [(t, float(w)) for t, w in zip(ex.tokens.tolist(), ex.target_weights().tolist()) if w]
    assert trained == [(t, 2.0) for t in [*enc("1 2 3"), end]] + [(t, 1.0) for t in [*enc("1 2 3"), end]]


@pytest.mark.parametrize("change, message", [
    (lambda r: r["messages"][0].update(content=[{"type": "text", "text": "a"}, {"type": "image", "url": "x.png"}]),
     r"rec: messages\[0\].content\[1\] is a 'image' part; only text parts"),
    (lambda r: r["messages"][2].update(train=True), r"rec: messages\[2\]: \['train'\] apply to assistant turns only"),
    (lambda r: r["messages"][3].update(weight=-1), r"rec: messages\[3\].weight must be a number >= 0, got -1"),
    (lambda r: r["messages"][3].update(train=True), r"rec: messages\[3\]: give 'train' or 'weight', not both"),
    (lambda r: r["messages"][1].update(tool_calls="sort"), r"rec: messages\[1\].tool_calls must be a list of objects"),
    (lambda r: r["messages"][2].update(loss=0), r"rec: messages\[2\] \(tool\) has unknown key\(s\) \['loss'\]"),
    (lambda r: r.update(tools={"name": "sort"}), r"rec: 'tools' must be a list of objects"),
])
def test_bad_tool_and_weight_fields_name_the_record_and_field(tmp_path, change, message):
    from sft_sharded.data.formats import RecordError

    tok, _, _ = _qwen3_tools(tmp_path)
    record = json.loads(json.dumps(TOOL_CHAT))
    change(record)
    with pytest.raises(RecordError, match=message):
        encode_record(record, tok, where="rec")


def test_per_turn_reasoning_trains_each_turn_with_its_reasoning_as_the_last_turn(tmp_path):
    """data.multi_turn_reasoning=per_turn: one example per assistant turn, rendered up to that turn, so a
    template that drops earlier reasoning still trains every turn's (the default, last, trains the
    whole rendering: see the test above)."""
    import dataclasses

    from sft_sharded.config import DataConfig
    from sft_sharded.data.pipeline import Encode

    directory = write_hf_tokenizer(tmp_path, QWEN3, eos_token="<|im_end|>",
                                   specials=("<|im_start|>", "<|im_end|>", "<think>", "</think>"))
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    enc = lambda s: raw.encode(s, add_special_tokens=False).ids  # noqa: E731
    end = raw.token_to_id("<|im_end|>")
    record = {"messages": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello there", "reasoning_content": "say hi"},
        {"role": "user", "content": "sort 3 1 2"},
        {"role": "assistant", "content": "1 2 3", "reasoning_content": "the digits in order"},
    ]}
    encode = Encode(dataclasses.replace(DataConfig(), multi_turn_reasoning="per_turn", max_length=256), HFTokenizer(directory))
    first, last = encode((record, "rec")).examples
    assert first.tokens.tolist() == enc("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>\nsay hi\n"
                                        "</think>\n\nhello there<|im_end|>\n")
    assert _trained(first) == [*enc("<think>\nsay hi\n</think>\n\nhello there"), end]
    assert last.tokens.tolist() == enc(
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>\n<|im_start|>user\n"
        "sort 3 1 2<|im_end|>\n<|im_start|>assistant\n<think>\nthe digits in order\n</think>\n\n1 2 3<|im_end|>\n")
    assert _trained(last) == [*enc("<think>\nthe digits in order\n</think>\n\n1 2 3"), end]
    whole, = Encode(dataclasses.replace(DataConfig(), max_length=256), HFTokenizer(directory))((record, "rec")).examples
    assert whole.tokens.tolist() == last.tokens.tolist() and _trained(whole) == [*enc("hello there"), end, *_trained(last)]


def test_the_template_environment_is_transformers(tmp_path):
    """Loop controls, tojson's arguments, strftime_now, the reasoning aliases and the special-token
    variables, each against transformers rendering the same template."""
    optional("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    from sft_sharded.data.templates import render

    source = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m.role }}:{{ m.reasoning_content or '' }}|{{ m.thinking or '' }}|{{ m.content }};{% endfor %}"
        "{{ {'b': 'é', 'a': [1, 2]} | tojson(indent=1, separators=(',', '= '), sort_keys=True, ensure_ascii=True) }}"
        "{{ strftime_now('%Y-%m-%d') }}{{ bos_token }}{{ eos_token }}{{ tools is none }}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning": "r"},
                {"role": "user", "content": "never rendered"}]
    tok = HFTokenizer(write_hf_tokenizer(tmp_path, source))
    ours = render(source, messages, tok)[0]
    theirs = render_jinja_template([messages], chat_template=source, bos_token="<s>", eos_token="</s>")[0][0]
    assert ours == theirs
    assert "assistant:r|r|b;" in ours and "never rendered" not in ours and '"b"= "\\u00e9"' in ours


@pytest.mark.parametrize("source, message", [
    ("{% set ns = namespace(_x=1) %}", "underscore attribute '_x'"),
    ("{{ messages.__class__ }}", "tried to access '__class__'"),
    # The sandbox caches its answers per (type, name): a safe method first, then a mutating one.
    ("{{ messages[0].keys() | list }}{{ messages[0].content.upper() }}{{ messages.append(1) }}",
     "tried to access 'append' of a list"),
    ("{{ messages[0].get('role') }}{{ messages[0].pop('role') }}", "tried to access 'pop' of a dict"),
    ("{{ messages[0].__class__ }}", "tried to access '__class__' of a dict"),
])
def test_the_sandbox_refuses_by_name(tmp_path, source, message):
    from jinja2.sandbox import SecurityError

    from sft_sharded.data.templates import render

    tok = HFTokenizer(write_hf_tokenizer(tmp_path, source))
    for _ in range(2):  # the second rendering answers from the cache
        with pytest.raises(SecurityError, match=message):
            render(source, [{"role": "user", "content": "a"}], tok)


def test_dict_lookups_are_jinjas_own():
    # A dict's keys are read before its attributes only for names dict has no attribute of: a key named like
    # a method (a JSON schema's "items") still loses to the method, as in jinja's own sandbox.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from sft_sharded.data.templates import compile_template

    source = ("{{ d.role }}|{{ d.missing is defined }}|{{ d.items() | list | length }}"
              "|{{ d['items'] }}|{{ d.get('role') }}|{{ d.nested.name }}")
    d = {"role": "user", "items": "schema items", "nested": {"name": "n"}}
    expected = ImmutableSandboxedEnvironment().from_string(source).render(d=d)
    assert compile_template(source).render(d=d) == expected == "user|False|3|schema items|user|n"


@pytest.mark.parametrize("source", [
    # globals of jinja's and of transformers', a macro, loop controls, a namespace, a global's name shadowed
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index is divisibleby 3 %}{% break %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{{ m.role }}{{ range(2) | list }}{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}",
    "{% macro turn(m) %}<{{ m.role }}>{{ m.content | trim }}{% endmacro %}{% for m in messages %}{{ turn(m) }}"
    "{% endfor %}{{ bos_token }}{{ pad_token }}{{ tools is none }}{{ documents }}{{ add_generation_prompt }}",
    "{% set range = 'shadowed' %}{{ range }}{% for namespace in messages %}{{ namespace.content }}{% endfor %}",
])
def test_a_render_is_jinjas_render(source):
    # The globals are merged into the context once per template instead of once per render: what a template
    # sees must be what jinja's own `render` gives it.
    from sft_sharded.data.templates import compile_template, render_raw, template_messages
    from sft_sharded.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    messages = [{"role": r, "content": f" {r} text "} for r in ("system", "user", "assistant", "user")]
    expected = compile_template(source).render(messages=template_messages(messages), tools=None, documents=None,
                                               add_generation_prompt=False, **tok.special_tokens_map)
    assert render_raw(source, messages, tok) == expected and expected


def test_a_failing_render_raises_what_jinjas_does():
    from jinja2.exceptions import UndefinedError

    from sft_sharded.data.templates import TemplateError, compile_template, render_raw
    from sft_sharded.data.tokenizers import ByteTokenizer

    tok, messages = ByteTokenizer(), [{"role": "user", "content": "a"}]
    with pytest.raises(UndefinedError, match="list object has no element 3"):
        compile_template("{{ messages[3].content }}").render(messages=messages)
    with pytest.raises(TemplateError, match="UndefinedError: list object has no element 3"):
        render_raw("{{ messages[3].content }}", messages, tok)
    # What render_raw does not rewrite passes through unchanged: raise_exception's error, an uncaught kind.
    for source in ("{{ 1 // 0 }}", "{{ raise_exception('stop') }}"):
        with pytest.raises(Exception) as ours:
            render_raw(source, messages, tok)
        with pytest.raises(Exception) as jinjas:
            compile_template(source).render(messages=messages)
        assert type(ours.value) is type(jinjas.value) and str(ours.value) == str(jinjas.value)


def test_the_sandbox_cache_keeps_types_apart():
    from sft_sharded.data.templates import compile_template

    class Stack:
        def pop(self):
            return 1

    env = compile_template("{{ x }}").environment
    for _ in range(2):  # either answer first, then both from the cache
        assert env.is_safe_attribute(Stack(), "pop", Stack().pop)
        assert not env.is_safe_attribute([], "pop", [].pop)
        assert not env.is_safe_attribute(Stack(), "_hidden", None)


def test_a_template_that_does_not_parse_is_one_error_naming_its_line(tmp_path, capsys):
    from sft_sharded.cli import main

    directory = write_hf_tokenizer(tmp_path / "tok", "{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    assert main(["data", f"data.path={data}", f"tokenizer.path={directory}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sft-sharded: error: the chat template of {directory}/tokenizer_config.json: line 2:")


def test_one_rendering_that_marks_every_message_finds_each_turn_as_its_own_rendering_does(tmp_path):
    from template_corpus import SHAPES, write_tokenizer

    from sft_sharded.data import turns
    from sft_sharded.data.templates import render

    tok = HFTokenizer(write_tokenizer(tmp_path, "Qwen-Qwen3-0.6B"))
    source, messages = tok.chat_template, SHAPES["multi_turn"]["messages"]  # system, user, assistant x 2
    text = render(source, messages, tok)[0]
    every = turns._every_message_marked(source, messages, tok, None, text)
    assert every is not None  # the common path: one rendering for all the turns
    for i in (2, 4):
        assert turns._turn_marks(i, every, source, messages, tok, None, text) == turns._turn_marks(
            i, None, source, messages, tok, None, text)
    # Text that already holds one of its marks: each turn is marked on its own instead.
    clash = [{**messages[0], "content": messages[0]["content"] + "\ue013"}, *messages[1:]]
    assert turns._every_message_marked(source, clash, tok, None, render(source, clash, tok)[0]) is None


def test_a_template_that_refuses_the_extra_marks_is_marked_one_turn_at_a_time(tmp_path):
    # Every message marked adds two characters to each; one turn's marks add one: this template then
    # raises only for the rendering that marks every message, and the row still trains.
    source = ("{% for m in messages %}{% if m['content'] | length > 9 %}{{ raise_exception('too long') }}"
              "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = HFTokenizer(write_hf_tokenizer(tmp_path, source))
    record = {"messages": [{"role": "user", "content": "abcdefgh"}, {"role": "assistant", "content": "12345678"}]}
    example = encode_record(record, tok)
    trained = tok.text_of(example.tokens[example.mask])
    assert trained == "12345678<|im_end|>", trained
