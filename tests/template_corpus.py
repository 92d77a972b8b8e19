"""The real chat templates in tests/chat_templates/ (see its README for their origin), the chats they are
tried on, and a tokenizer for each template: BPE trained here, with the template's control tokens added.

Which added tokens are *special* follows the published tokenizers: pipe-delimited control tokens
(`<|im_end|>`, `<｜end▁of▁sentence｜>`), bracketed ones (`[INST]`), `<s>`/`</s>`, Gemma's turn tokens and
`<seed:...>`, Nemotron's `<SPECIAL_n>` and MiniMax's `]~b]` and `[e~[` are special; XML-like tags (`<think>`, `<tool_call>`) are added but not special, as in Qwen's and
DeepSeek's tokenizers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TEMPLATES = Path(__file__).parent / "chat_templates"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris, France"}}}

# Each assistant message has words found nowhere else, so a reference can find it in the rendering.
SHAPES = {
    "basic": {"messages": [{"role": "user", "content": "Say hi."},
                           {"role": "assistant", "content": "Hi there, friend!"}]},
    "system": {"messages": [{"role": "system", "content": "You are terse."},
                            {"role": "user", "content": "Say hi."},
                            {"role": "assistant", "content": "Hi there, friend!"}]},
    "multi_turn": {"messages": [{"role": "system", "content": "You do arithmetic."},
                                {"role": "user", "content": "What is 2+2?"},
                                {"role": "assistant", "content": "It is four."},
                                {"role": "user", "content": "And times 3?"},
                                {"role": "assistant", "content": "Twelve, exactly."}]},
    "tool_call": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "22C and sunny"},
        {"role": "assistant", "content": "Paris is sunny, 22 degrees."}]},
    "reasoning": {"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is four.", "reasoning_content": "Two plus two makes four."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "Twelve, exactly.", "reasoning_content": "Four times three is twelve."}]},
    "thinking_key": {"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is four.", "thinking": "Two plus two makes four."}]},
    "unicode": {"messages": [{"role": "user", "content": "Grüße aus Köln — 日本語? 🚀"},
                             {"role": "assistant", "content": "Ça va très bien 👍 — 東京より"}]},
}

_SPECIAL = re.compile(r"<\|[^<>\s]{0,40}?\|?>|<[^<>\s|]{1,40}\|>|<｜[^<>\s]{1,40}?｜>|\[/?[A-Z][A-Z_]{1,30}\]|"
                      r"</?s>|<(?:start|end)_of_turn>|<(?:bos|eos)>|<seed:[a-z_]+>|<SPECIAL_\d+>|\]~b\]|\[e~\[|\]~!b\[")
_ADDED = re.compile(r"</?[A-Za-z][A-Za-z_]{1,20}>")
# Control tokens that a template builds from pieces (so its text does not name them whole).
_BUILT = {"tencent-Hy3": ["<｜hy_eos:opensource｜>", "<｜hy_User:opensource｜>", "<｜hy_Assistant:opensource｜>"]}
_LINES = ["the cat sat on the mat", "hello world, hello there", "What is the weather in Paris today",
          "user asks and the assistant answers", "Twelve, exactly. It is four."] * 20


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def control_tokens(source: str) -> tuple[list[str], list[str]]:
    """(special, added-but-not-special) tokens named in the template's text."""
    special = sorted(set(_SPECIAL.findall(source)) | {"<s>", "</s>"})
    added = sorted(set(_ADDED.findall(source)) - set(special))
    return special, added


def write_tokenizer(directory: Path, name: str) -> Path:
    """A tokenizer directory (tokenizer.json, tokenizer_config.json with the template) for one template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    source = (TEMPLATES / f"{name}.jinja").read_text()
    special, added = control_tokens(source)
    special = sorted(set(special) | set(_BUILT.get(name, ())))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_LINES, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": source}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def transformers_ids(directory: Path, record: dict) -> list[int] | str:
    """transformers' `apply_chat_template` ids of the record, or the name of the error it raises."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    source = json.loads((directory / "tokenizer_config.json").read_text())["chat_template"]
    try:
        out = tok.apply_chat_template(record["messages"], tools=record.get("tools"), chat_template=source,
                                      tokenize=True, return_dict=False)
    except Exception as err:  # noqa: BLE001 - whatever the template raises is the answer we record
        return f"{type(err).__name__}: {err}"
    return list(out)
