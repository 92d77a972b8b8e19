"""Chat templates rendered in jinja2's immutable sandbox, and the assistant (trained) token mask.

The mask comes from `{% generation %}...{% endgeneration %}` markers when the template has them: the block
wraps its output in two private-use sentinel characters, which are found and removed after rendering.
Otherwise each assistant turn is located by rendering the conversation prefix by prefix: the tokens that
`messages[:i+1]` adds beyond `messages[:i]` + generation prompt (longest common token prefix) are the turn,
less trailing whitespace-only tokens (the template's separator between turns).

Some templates render a turn differently once later turns follow it (Qwen3 drops the reasoning of turns
before the last user message, and wraps only the last turn in `<think>` tags), so `messages[:i+1]` is not a
prefix of the whole conversation. Then the turn is what the whole rendering has after the prompt
`messages[:i]` + generation prompt (which must be its prefix), up to and including the tokenizer's first
stop token (the turn end, e.g. `<|im_end|>`): the conversation is trained as the template renders it whole.
"""

from __future__ import annotations

import functools
import json

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

START, END = "\ue000", "\ue001"  # private-use characters; content containing them is rejected


class TemplateError(ValueError):
    """A conversation the template cannot render or mask (reported per row, never silently trained)."""


class _Generation(Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

    def _wrap(self, caller):
        return START + caller() + END


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj, attribute):
        # The default returns an Undefined that fails only when used; fail at once, naming the attribute.
        raise SecurityError(f"chat template tried to access {attribute!r} of a {type(obj).__name__} object")


def _raise(message):
    raise TemplateError(f"chat template raised: {message}")


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def has_generation_markers(source: str) -> bool:
    return "{% generation %}" in source.replace("{%-", "{%").replace("-%}", "%}")


def render(source: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans inside `{% generation %}` blocks (empty without markers).
    `tools` (JSON schemas) reach the template as transformers passes them: only when given."""
    dumped = json.dumps([messages, tools], ensure_ascii=False)
    if START in dumped or END in dumped:
        raise TemplateError("the conversation contains reserved characters U+E000/U+E001")
    extra = {} if tools is None else {"tools": tools}
    raw = compile_template(source).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "", **extra,
    )
    text, spans, pos, opened = [], [], 0, None
    for char in raw:
        if char == START:
            opened = pos
        elif char == END:
            spans.append((opened, pos))
            opened = None
        else:
            text.append(char)
            pos += 1
    return "".join(text), spans


def _spans_to_mask(offsets, spans) -> np.ndarray:
    starts = np.array([o[0] for o in offsets]) if offsets else np.zeros(0, int)
    mask = np.zeros(len(offsets), bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _turn_in_whole(ids: list[int], prompt_ids: list[int], stop_ids, i: int) -> tuple[int, int]:
    """(start, end) of assistant turn `i` in a rendering that rewrote it: after its prompt, through the
    first stop token."""
    if ids[: len(prompt_ids)] != prompt_ids:
        raise TemplateError(f"neither messages[:{i + 1}] nor the prompt messages[:{i}] renders as a prefix of "
                            "the whole conversation")
    ends = [t for t in range(len(prompt_ids), len(ids)) if ids[t] in stop_ids]
    if not ends:
        raise TemplateError(f"assistant turn {i} has no stop token {list(stop_ids)} after it in the rendering")
    return len(prompt_ids), ends[0] + 1


def encode_chat(source: str, messages: list[dict], tokenizer, train_on_all: bool = False,
                tools: list[dict] | None = None, turn_weights: list[float | None] | None = None,
                ) -> tuple[list[int], np.ndarray]:
    """Token ids of the rendered conversation and each token's float32 weight as a target (0: not
    trained). Assistant turns weigh 1 unless `turn_weights[i]` (a message's `train`/`weight`) says
    otherwise; with `train_on_all` every token weighs 1."""
    text, spans = render(source, messages, tokenizer, tools=tools)
    ids, offsets = tokenizer.encode(text)
    if train_on_all:
        return ids, np.ones(len(ids), np.float32)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    weight = {i: 1.0 if turn_weights is None or turn_weights[i] is None else turn_weights[i] for i in assistant}
    weights = np.zeros(len(ids), np.float32)
    if has_generation_markers(source):
        if len(spans) != len(assistant) and set(weight.values()) != {1.0}:
            raise TemplateError(f"per-message weights need one {{% generation %}} block per assistant turn; the "
                                f"template rendered {len(spans)} for {len(assistant)} turns")
        for k, span in enumerate(spans):
            weights[_spans_to_mask(offsets, [span])] = weight[assistant[k]] if len(spans) == len(assistant) else 1.0
    else:
        for i in assistant:
            prompt_ids = tokenizer.encode(render(source, messages[:i], tokenizer, True, tools)[0])[0]
            turn_ids = tokenizer.encode(render(source, messages[: i + 1], tokenizer, tools=tools)[0])[0]
            if ids[: len(turn_ids)] == turn_ids:
                start, end = _common_prefix(prompt_ids, turn_ids), len(turn_ids)
                # Whitespace the template puts between turns (ChatML's "\n" after <|im_end|>) is not the
                # assistant's to say: generation markers leave it out too.
                while end > start and not text[offsets[end - 1][0] : offsets[end - 1][1]].strip():
                    end -= 1
            else:
                start, end = _turn_in_whole(ids, prompt_ids, tokenizer.stop_ids, i)
            weights[start:end] = weight[i]
    if not weights.any() and not any(w == 0 for w in weight.values()):
        raise TemplateError("the assistant mask is empty: no assistant tokens to train on")
    return ids, weights
