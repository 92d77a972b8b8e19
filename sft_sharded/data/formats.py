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

from sft_sharded.data.templates import TemplateError
from sft_sharded.data.turns import NotLocatable, encode_chat
from sft_sharded.data.tokenizers import bos_ids
from sft_sharded.errors import UserError

FORMATS = ("text", "prompt_completion", "messages")
ROLES = ("system", "user", "assistant", "tool")
# Message keys passed to the chat template as given (transformers' names), besides role and content.
TEMPLATE_KEYS = {"assistant": ("tool_calls", "reasoning_content", "thinking", "reasoning"),
                 "tool": ("name", "tool_call_id")}
TRAINING_KEYS = ("train", "weight")  # per assistant turn: overrides the default (trained, weight 1)


class RecordError(UserError):
    """A malformed record: an error that stops the run, naming its file and line."""


class RowSkipped(ValueError):
    """A well-formed record that cannot be trained on (e.g. an empty assistant mask): counted and reported
    by `reason` (the cause without the record's place, so equal causes count together)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [n]
    mask: np.ndarray  # bool [n]: token i is a trained target
    truncated: bool = False
    weights: np.ndarray | None = None  # float32 [n]: each target's weight in the loss (None: 1 where mask)

    def target_weights(self) -> np.ndarray:
        return self.mask.astype(np.float32) if self.weights is None else np.where(self.mask, self.weights, 0.0)


# ShareGPT's speaker names (its "from" field) -> our roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool", "tool": "tool"}


def rename_columns(record: Any, columns: dict[str, str]) -> Any:
    """A record with `data.columns` applied: top-level keys renamed (`conversations` -> `messages`) and, in
    each message, keys renamed too (ShareGPT's `from`/`value` -> `role`/`content`, with its speaker names
    mapped to roles). A key not in `columns` is kept as it is; a non-object record is left to the checks."""
    if not isinstance(record, dict):
        return record
    out = {columns.get(key, key): value for key, value in record.items()}
    if isinstance(out.get("messages"), list):
        messages = [{columns.get(k, k): v for k, v in m.items()} if isinstance(m, dict) else m
                    for m in out["messages"]]
        if "from" in columns:
            for m in messages:
                if isinstance(m, dict) and m.get("role") in SHAREGPT_ROLES:
                    m["role"] = SHAREGPT_ROLES[m["role"]]
        out["messages"] = messages
    return out


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


def _content(message: dict, where: str) -> str:
    """A message's text: a string, or a list of text parts joined (transformers' multimodal form)."""
    content = message.get("content")
    if content is None and message.get("tool_calls"):
        return ""  # an assistant turn that only calls tools
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecordError(f"{where}.content[{j}] is a {kind!r} part; only text parts "
                                  "({'type': 'text', 'text': ...}) are supported")
        return "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise RecordError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")
    return content


def _weight(message: dict, where: str) -> float:
    """The turn's weight in the loss from `train` (bool) or `weight` (a number >= 0); 1 without either."""
    if message["role"] != "assistant":
        raise RecordError(f"{where}: {[k for k in TRAINING_KEYS if k in message]} apply to assistant turns only "
                          "(data.train_on_prompt trains every token)")
    if "train" in message and "weight" in message:
        raise RecordError(f"{where}: give 'train' or 'weight', not both")
    if "train" in message:
        if not isinstance(message["train"], bool):
            raise RecordError(f"{where}.train must be true or false, got {message['train']!r}")
        return float(message["train"])
    weight = message["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise RecordError(f"{where}.weight must be a number >= 0, got {weight!r}")
    return float(weight)


def chat_messages(record: dict, where: str) -> tuple[list[dict], list[float | None]]:
    """The messages as the template gets them (text parts stay a list, as transformers passes them), and
    each one's weight (None: the default rule)."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: 'messages' must be a non-empty list")
    out, weights = [], []
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise RecordError(f"{at} must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"{at} has unknown role {role!r}; expected one of {ROLES}")
        allowed = ("role", "content", *TEMPLATE_KEYS.get(role, ()), *TRAINING_KEYS)
        unknown = sorted(set(message) - set(allowed))
        if unknown:
            raise RecordError(f"{at} ({role}) has unknown key(s) {unknown}; allowed: {list(allowed)}")
        if "tool_calls" in message and not (isinstance(message["tool_calls"], list)
                                            and all(isinstance(c, dict) for c in message["tool_calls"])):
            raise RecordError(f"{at}.tool_calls must be a list of objects")
        for key in ("reasoning_content", "thinking", "reasoning", "name", "tool_call_id"):
            if key in message and not isinstance(message[key], str):
                raise RecordError(f"{at}.{key} must be a string, got {type(message[key]).__name__}")
        _content(message, at)  # checked here; the template gets the content as given, as in transformers
        out.append({k: message[k] for k in allowed if k in message and k not in TRAINING_KEYS})
        weights.append(_weight(message, at) if any(k in message for k in TRAINING_KEYS) else None)
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RecordError(f"{where}: 'tools' must be a list of objects (JSON schemas of the functions)")
    return out, weights


def encode_record(record: Any, tokenizer, *, fmt: str = "auto", train_on_prompt: bool = False,
                  where: str = "record") -> Example:
    """Tokens and mask of one record, untruncated. `fmt="auto"` detects the format from the keys."""
    fmt = detect_format(record, where) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise RecordError(f"{where}: unknown format {fmt!r}; expected one of {FORMATS} or 'auto'")
    if fmt == "messages":
        if tokenizer.chat_template is None:
            raise RecordError(f"{where}: 'messages' data needs a chat template and the tokenizer has none")
        messages, turn_weights = chat_messages(record, where)
        try:
            ids, weights = encode_chat(tokenizer.chat_template, messages, tokenizer, train_on_prompt,
                                       record.get("tools"), turn_weights)
        except NotLocatable as err:
            name = getattr(tokenizer, "template_name", "the chat template")
            raise RowSkipped(f"{where}: {err} in {name}", f"assistant turn not locatable in {name}: {err.why}") from err
        except TemplateError as err:
            raise RowSkipped(f"{where}: {err}", str(err)) from err
        except SecurityError as err:  # the sandbox stopped the template: the template is at fault, not the row
            raise RecordError(f"{where}: the chat template was stopped by the sandbox: {err}") from None
        weights[:1] = 0.0  # the first token is never a target
        mask = weights != 0
        if not mask.any():
            raise RowSkipped(f"{where}: every trained token has weight 0", "every trained token has weight 0")
        # Every weight is a turn's (or 1): with 0/1 turns the weights are the mask itself.
        plain = train_on_prompt or all(w is None or w in (0.0, 1.0) for w in turn_weights)
        return Example(np.asarray(ids, np.int32), mask, weights=None if plain else weights)
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


def encode_turns(record: Any, tokenizer, *, where: str = "record") -> list[Example]:
    """`data.multi_turn_reasoning=per_turn`: one example per trained assistant turn of a chat record, each
    the conversation rendered up to and including that turn with only that turn trained. A template that
    drops earlier turns' reasoning then still trains every turn's reasoning, each as the last turn."""
    messages, turn_weights = chat_messages(record, where)
    examples = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or turn_weights[i] == 0:
            continue
        # Earlier assistant turns are context here (weight 0); this turn keeps its own weight.
        weights = [0.0 if m["role"] == "assistant" else None for m in messages[:i]] + [turn_weights[i]]
        turn = {**record, "messages": [dict(m, **({"weight": w} if w is not None else {}))
                                       for m, w in zip(messages[: i + 1], weights)]}
        examples.append(encode_record(turn, tokenizer, fmt="messages", where=f"{where} (turn {i})"))
    return examples


def fit_length(example: Example, max_length: int, policy: str) -> Example | None:
    """At most `max_length` input positions (max_length + 1 tokens). policy: "truncate" keeps the start,
    "drop" drops the row. None when the row is dropped or has no trained target left."""
    if len(example.tokens) - 1 > max_length:
        if policy == "drop":
            return None
        keep = slice(0, max_length + 1)
        example = Example(example.tokens[keep], example.mask[keep], truncated=True,
                          weights=None if example.weights is None else example.weights[keep])
    if len(example.tokens) < 2 or not example.mask[1:].any():
        return None
    return example
