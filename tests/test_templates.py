"""Chat templates of the 2026 families: golden trained-token lists under Gemma's template (no system role:
merged into the first user turn) and a Qwen3-style template that rewrites history (earlier turns lose
their reasoning; only the last turn is wrapped in <think> tags)."""

import json

import pytest
from data_fixtures import write_hf_tokenizer
from tokenizers import Tokenizer

from sft_sharded.data.formats import encode_record
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
