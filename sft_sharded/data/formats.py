"""Record -> tokens + trained-token mask, for `text`, `prompt`/`completion` and chat `messages` records.

`Example.mask[i]` says whether token i is a training *target*. The model sees `tokens[:-1]` and predicts
`tokens[1:]`, so BOS is never a target and the final EOS (or turn-end token) always is, when it is kept.
Prompt and completion are tokenized separately and concatenated, so the mask boundary is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jinja2.sandbox import SecurityError

from sft_sharded.data.templates import TemplateError, encode_chat
from sft_sharded.data.tokenizers import bos_ids
from sft_sharded.errors import UserError

FORMATS = ("text", "prompt_completion", "messages")
ROLES = ("system", "user", "assistant")


class RecordError(UserError):
    """A malformed record: an error that stops the run, naming its file and line."""


class RowSkipped(ValueError):
    """A well-formed record that cannot be trained on (e.g. an empty assistant mask): counted and reported."""


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [n]
    mask: np.ndarray  # bool [n]: token i is a trained target
    truncated: bool = False


def detect_format(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise RecordError(f"{where}: no known format in keys {sorted(record)}; expected 'text', "
                      "'prompt' and 'completion', or 'messages'")


def _string(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(record: dict, where: str) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"{where}: messages[{i}] must be an object")
        if message.get("role") not in ROLES:
            raise RecordError(f"{where}: messages[{i}] has unknown role {message.get('role')!r}; expected one of {ROLES}")
        if not isinstance(message.get("content"), str):
            raise RecordError(f"{where}: messages[{i}].content must be a string, got "
                              f"{type(message.get('content')).__name__}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def encode_record(record: Any, tokenizer, *, fmt: str = "auto", train_on_prompt: bool = False,
                  where: str = "record") -> Example:
    """Tokens and mask of one record, untruncated. `fmt="auto"` detects the format from the keys."""
    fmt = detect_format(record, where) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise RecordError(f"{where}: unknown format {fmt!r}; expected one of {FORMATS} or 'auto'")
    if fmt == "messages":
        if tokenizer.chat_template is None:
            raise RecordError(f"{where}: 'messages' data needs a chat template and the tokenizer has none")
        try:
            ids, mask = encode_chat(tokenizer.chat_template, _messages(record, where), tokenizer, train_on_prompt)
        except TemplateError as err:
            raise RowSkipped(f"{where}: {err}") from err
        except SecurityError as err:  # the sandbox stopped the template: the template is at fault, not the row
            raise RecordError(f"{where}: the chat template was stopped by the sandbox: {err}") from None
        mask[:1] = False  # the first token is never a target
        return Example(np.asarray(ids, np.int32), mask)
    bos = bos_ids(tokenizer)
    eos = [tokenizer.eos_id]
    if fmt == "text":
        body = tokenizer.encode(_string(record, "text", where))[0]
        tokens = bos + body + eos
        mask = np.ones(len(tokens), bool)
    else:
        prompt = tokenizer.encode(_string(record, "prompt", where))[0]
        completion = tokenizer.encode(_string(record, "completion", where))[0]
        tokens = bos + prompt + completion + eos
        mask = np.zeros(len(tokens), bool)
        mask[0 if train_on_prompt else len(bos) + len(prompt) :] = True
    mask[: len(bos)] = False  # BOS is context, never a target
    return Example(np.asarray(tokens, np.int32), mask)


def fit_length(example: Example, max_length: int, policy: str) -> Example | None:
    """At most `max_length` input positions (max_length + 1 tokens). policy: "truncate" keeps the start,
    "drop" drops the row. None when the row is dropped or has no trained target left."""
    if len(example.tokens) - 1 > max_length:
        if policy == "drop":
            return None
        example = Example(example.tokens[: max_length + 1], example.mask[: max_length + 1], truncated=True)
    if len(example.tokens) < 2 or not example.mask[1:].any():
        return None
    return example
