"""Which tokens of a rendered chat the assistant says: each turn located from the template's own renderings,
exactly, or the conversation is refused. Never a guess.

A template with `{% generation %}` blocks says it itself (transformers' `return_assistant_tokens_mask`).
Otherwise, for assistant turn i of the whole rendering W:

- **its own text**: W is rendered again with marks after the last visible character of the text fields
  (content, reasoning, string tool-call arguments) of every message before i and of turn i, and before the
  first of message i+1's. Without the marks that rendering must be W character for character, else the
  template rewrites the text in a way the marks cannot follow: refused. The turn must start after every
  earlier message's text, reach past its own and end before the next message's. (One rendering that marks
  every message's start and end, with marks of its own, serves all the turns where it is W without the
  marks; otherwise each turn is rendered with just its own marks, as above.)
- **start**: where `messages[:i]` rendered with the generation prompt ends, when that is how W begins (what
  the model continues from at inference). A thinking template's generation prompt may open reasoning
  (`<think>`) that W writes otherwise for a turn without any: then the turn starts right after the longest
  start of the generation prompt that W has, in whole tokens, between the earlier messages' text and the
  turn's own. Neither (Mistral-Nemo moves the system prompt to the last user message, so earlier turns
  have no exact place; Command R7B always ends on an open assistant turn): refused.
- **end**: where `messages[:i+1]` ends, less trailing whitespace, when that is how W begins (for the last
  turn: when W begins a conversation with one more user message), taking a closing token the template
  writes only when another message follows. Otherwise, where the template writes a last turn differently
  (gpt-oss closes it with `<|return|>`, earlier ones with `<|end|>`; Qwen3 keeps reasoning only after the
  last user message), the turn ends with the first stop or special token after its own text, unless the
  token that opens an assistant turn comes first (the template never closed it: refused). A last turn
  nothing closes ends with the conversation.

A turn boundary inside a token is refused too: a token is the assistant's or the prompt's, never half.
"""

from __future__ import annotations

import functools
import json
import re

import numpy as np

from sft_sharded.data.templates import (NEXT_START, OWN_END, OWN_START, PREV_END, REASONING_KEYS, RESERVED,
                                        RESERVED_RE, TemplateError, has_generation_markers, render, render_raw,
                                        render_text, strip_marks)


class NotLocatable(TemplateError):
    """An assistant turn whose tokens cannot be derived exactly from the template; `why` without the turn's
    index, to count refusals by cause."""

    def __init__(self, turn: int, why: str):
        super().__init__(f"assistant turn {turn} not locatable: {why}")
        self.why = why


def _mark_text(text: str, mark: str, at_end: bool) -> str:
    """`text` with `mark` after its last (or before its first) non-whitespace character: templates that trim
    or strip still keep it, and the rest of the text is unchanged."""
    stripped = text.rstrip() if at_end else text.lstrip()
    if not stripped:
        return text
    if at_end:
        return stripped + mark + text[len(stripped):]
    return text[: len(text) - len(stripped)] + mark + stripped


def _mark_leaves(value, mark: str, at_end: bool):
    if isinstance(value, str):
        return _mark_text(value, mark, at_end)
    if isinstance(value, dict):
        return {k: _mark_leaves(v, mark, at_end) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark_leaves(v, mark, at_end) for v in value]
    return value


def _mark_message(message: dict, mark: str, at_end: bool) -> dict:
    """The message with its text fields marked: content (or its text parts), reasoning, tool-call arguments.
    Names, ids and types stay as they are (templates compare them)."""
    out = dict(message)
    content = message.get("content")
    if isinstance(content, str):
        out["content"] = _mark_text(content, mark, at_end)
    elif isinstance(content, list):
        out["content"] = [dict(p, text=_mark_text(p["text"], mark, at_end)) if isinstance(p.get("text"), str)
                          else p for p in content]
    for key in REASONING_KEYS:
        if isinstance(message.get(key), str):
            out[key] = _mark_text(message[key], mark, at_end)
    if isinstance(message.get("tool_calls"), list):
        calls = []
        for call in message["tool_calls"]:
            function = call.get("function") if isinstance(call.get("function"), dict) else None
            if function is not None and "arguments" in function:
                arguments = _mark_leaves(function["arguments"], mark, at_end)
                call = {**call, "function": {**function, "arguments": arguments}}
            calls.append(call)
        out["tool_calls"] = calls
    return out


def _marked_positions(source, messages, marks: dict[int, tuple[str, bool]], tokenizer, tools, text
                      ) -> dict[str, list[int]] | None:
    """W rendered with message j's text fields marked by `marks[j] = (mark, at_end)`: where each mark lands,
    in W's characters; None when that rendering is not W once the marks are removed."""
    marked = [_mark_message(m, *marks[j]) if j in marks else m for j, m in enumerate(messages)]
    raw = render_raw(source, marked, tokenizer, tools=tools)
    found = {mark: [] for mark, _ in marks.values()}
    plain, reserved = strip_marks(raw, RESERVED_RE)  # generation sentinels are not in W's coordinates either
    for char, pos in reserved:
        if char in found:
            found[char].append(pos)
    return found if plain == text else None


# One rendering marks every message, with two private-use characters of its own each (start, end), from here.
_EVERY_FROM = 0xE010


def _every_message_marked(source, messages, tokenizer, tools, text) -> tuple[list, list] | None:
    """W rendered once with every message's text fields marked at their start and end: each message's
    (start positions, end positions) in W's characters. None, so that each turn is marked on its own, when
    that rendering fails or is not W once the marks are removed, or the conversation already holds one of
    the marks (or has too many messages for them)."""
    last = _EVERY_FROM + 2 * len(messages) - 1
    if not messages or last > 0xF8FF:
        return None
    ours = re.compile(f"[{chr(_EVERY_FROM)}-{chr(last)}]")
    if ours.search(json.dumps([messages, tools], ensure_ascii=False)):
        return None
    marked = [_mark_message(_mark_message(m, chr(_EVERY_FROM + 2 * j), False), chr(_EVERY_FROM + 2 * j + 1), True)
              for j, m in enumerate(messages)]
    try:
        raw = render_raw(source, marked, tokenizer, tools=tools)
    except TemplateError:  # a template that refuses the extra marks: each turn on its own decides
        return None
    every = re.compile(f"[{''.join(RESERVED)}{chr(_EVERY_FROM)}-{chr(last)}]")  # generation sentinels too
    starts, ends = [[] for _ in messages], [[] for _ in messages]
    plain, found = strip_marks(raw, every)
    for char, pos in found:
        k = ord(char) - _EVERY_FROM
        if k >= 0:
            (ends if k % 2 else starts)[k // 2].append(pos)
    return (starts, ends) if plain == text else None


def _turn_marks(i: int, every, source, messages, tokenizer, tools, text) -> dict[str, list[int]]:
    """Where the text of the messages before turn i ends (PREV_END), the turn's own ends (OWN_END) and message
    i+1's starts (NEXT_START), in W: from the rendering that marks every message where it is W, else from
    one that marks just these."""
    if every is not None:
        starts, ends = every
        return {PREV_END: [p for j in range(i) for p in ends[j]], OWN_END: ends[i],
                NEXT_START: starts[i + 1] if i + 1 < len(messages) else []}
    marks = {j: (PREV_END, True) for j in range(i)} | {i: (OWN_END, True), i + 1: (NEXT_START, False)}
    found = _marked_positions(source, messages, marks, tokenizer, tools, text)
    if found is None:
        raise NotLocatable(i, "the template rewrites the message text, so the turn's own text cannot be "
                              "followed into the rendering")
    return found


def _start_after_header(prompt: str, context: str, text: str, after: int, before: int, offsets) -> int | None:
    """Where turn i starts when the prompt is not a prefix of W: right after the longest start of the
    generation prompt (the prompt's text beyond `context`, the messages without it) that W has, as whole
    tokens, between `after` (the end of every earlier message's text) and `before` (the end of the turn's
    first field). Thinking templates open reasoning in the generation prompt (`<think>`) and render a turn
    without any differently; the header before it is the same."""
    if not prompt.startswith(context) or len(prompt) == len(context):
        return None
    header = prompt[len(context):]
    token_starts = set(offsets[:, 0].tolist()) | {len(text)}
    for k in range(len(header), 0, -1):
        at = text.find(header[:k], after, before)
        if at >= 0 and at in token_starts and at + k in token_starts:
            return at + k
    return None


def _end_by_prefix(source, messages, i, tokenizer, tools, text) -> int | None:
    try:
        upto = render_text(source, messages[: i + 1], tokenizer, tools=tools)
    except TemplateError:
        return None
    return len(upto.rstrip()) if text.startswith(upto) else None


def _end_of_last(source, messages, tokenizer, tools, text, lo: int) -> int | None:
    """The end of the last turn when the template renders the conversation the same with a user message
    after it: W's end less trailing whitespace. (A template that appends text after the last message, such
    as Command R's closing instruction, fails this; the turn then needs a closing token.)"""
    probe = [*messages, {"role": "user", "content": "?"}]
    try:
        longer = render_text(source, probe, tokenizer, tools=tools)
    except TemplateError:
        return None
    end = len(text.rstrip())
    return end if longer.startswith(text[:end]) and end >= lo else None


def _extend_to_closer(offsets, ids, text, end: int, hi: int, closers: set[int], opens) -> int:
    """A turn that ends without a closing token where it ends as the last message, but is followed in W by
    one (across whitespace only): the template writes the close only when another message follows (Apertus's
    `<|assistant_end|>`; GLM, whose turns end with the next `<|user|>`, a stop token of the model). The turn
    takes it, as the model must learn to stop."""
    t = _first_at(offsets, end)
    if t == 0 or ids[t - 1] in closers:
        return end
    for (start, stop), token in zip(offsets[t:].tolist(), ids[t:]):
        if stop > hi:
            return end
        if token in closers:
            return end if opens(token) else stop
        if text[start:stop].strip():
            return end
    return end


def _first_at(offsets, lo: int) -> int:
    """The index of the first token that starts at or after character `lo`."""
    after = np.flatnonzero(offsets[:, 0] >= lo)
    return int(after[0]) if after.size else len(offsets)


def _end_by_token(offsets, ids, is_closer, lo: int, hi: int, opens) -> int | None:
    """The end of the first stop or special token (`is_closer`, per token) in [lo, hi), unless it is the
    token that opens an assistant turn (`opens`: the generation prompt's first, itself special): then the
    template did not close the turn before the next."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    closing = np.flatnonzero((starts >= lo) & (ends <= hi) & is_closer)
    if not closing.size:
        return None
    return None if opens(ids[closing[0]]) else int(ends[closing[0]])


def _token_range(offsets, lo: int, hi: int, i: int) -> tuple[int, int]:
    """Token indices [a, b) of the characters [lo, hi); refused when a token straddles either boundary."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    if np.any((starts < lo) & (ends > lo)) or np.any((starts < hi) & (ends > hi)):
        raise NotLocatable(i, "its boundary falls inside a token")
    inside = np.nonzero((starts >= lo) & (starts < hi))[0]
    return (int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0)


def _opener(prompt: str, context: str, tokenizer) -> int | None:
    """The first token of the generation prompt's header (`<|im_start|>`, `<|start|>`) when it is a special
    token (a plain-text header's first piece could be any text's)."""
    header = prompt[len(context):] if prompt.startswith(context) else ""
    ids = tokenizer.encode(header)[0] if header else []
    return ids[0] if ids and ids[0] in getattr(tokenizer, "special_token_ids", ()) else None


def turn_char_spans(source: str, messages: list[dict], tokenizer, tools, text: str, offsets, ids
                    ) -> dict[int, tuple[int, int]]:
    """Character span [start, end) in W of every assistant turn (see the module's rule)."""
    specials = set(getattr(tokenizer, "special_token_ids", ()))
    closers = set(getattr(tokenizer, "stop_ids", ())) | specials
    is_closer = np.isin(np.asarray(ids), list(closers))
    every = functools.cache(lambda: _every_message_marked(source, messages, tokenizer, tools, text))
    spans = {}
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        found = _turn_marks(i, every(), source, messages, tokenizer, tools, text)
        earlier_end = max(found[PREV_END], default=0)
        prompt = render_text(source, messages[:i], tokenizer, True, tools)
        # The prompt without the generation prompt, and the header's first token: needed only off the
        # common path (no prefix, or a turn that ends without its closing token), so rendered then.
        context = functools.cache(lambda: render_text(source, messages[:i], tokenizer, False, tools) if i else "")
        opener = functools.cache(lambda: _opener(prompt, context(), tokenizer))

        def opens(token, opener=opener) -> bool:  # only a special token can be the opener: no rendering else
            return token in specials and token == opener()

        if text.startswith(prompt):
            start = len(prompt)
        else:
            own = _marked_positions(source, messages, {i: (OWN_START, False)}, tokenizer, tools, text)
            own_start = min(own[OWN_START], default=len(text)) if own is not None else None
            start = None if own_start is None else _start_after_header(prompt, context(), text, earlier_end,
                                                                       own_start, offsets)
            if start is None:
                raise NotLocatable(i, "the conversation before it, with the generation prompt, does not render as "
                                      "the start of the whole conversation, nor does the generation prompt's "
                                      "header follow the earlier messages there")
        if earlier_end > start:
            raise NotLocatable(i, "an earlier message's text is rendered after the turn's start (the template "
                                  "renders earlier messages differently once later ones follow)")
        lo, hi = max([start, *found[OWN_END]]), min([len(text), *found.get(NEXT_START, [])])
        if i == len(messages) - 1:
            end = _end_of_last(source, messages, tokenizer, tools, text, lo)
        else:
            end = _end_by_prefix(source, messages, i, tokenizer, tools, text)
        if end is not None and lo <= end <= hi:
            end = _extend_to_closer(offsets, ids, text, end, hi, closers, opens)
        else:
            end = _end_by_token(offsets, ids, is_closer, lo, hi, opens)
        if end is None and i == len(messages) - 1 and opener() not in ids[_first_at(offsets, lo):]:
            end = len(text.rstrip())  # nothing closes the last turn but the conversation's end
        if end is None:
            raise NotLocatable(i, "neither the conversation up to it renders as the start of the whole "
                                  "conversation nor does a stop or special token close the turn before the next")
        spans[i] = (start, end)
    return spans


def turn_token_spans(source, messages, tokenizer, tools, text, ids, offsets) -> dict[int, tuple[int, int]]:
    """Token index span [a, b) of every assistant turn."""
    return {i: _token_range(offsets, lo, hi, i)
            for i, (lo, hi) in turn_char_spans(source, messages, tokenizer, tools, text, offsets, ids).items()}


def _overlapping(offsets, lo: int, hi: int) -> tuple[int, int]:
    """Token indices [a, b) of the tokens overlapping [lo, hi), as transformers masks a generation block."""
    inside = np.flatnonzero((offsets[:, 1] > lo) & (offsets[:, 0] < hi))
    return (int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0)


def assistant_turns(source: str, messages: list[dict], tokenizer, tools=None
                    ) -> tuple[list[int], str, dict[int, tuple[int, int]]]:
    """Token ids of the whole rendering, its text, and the token span [a, b) of each assistant turn i.

    With `{% generation %}` blocks the spans are the blocks'; when their number differs from the number
    of assistant turns (a template that marks only some), they are keyed -1, -2, ... instead."""
    text, blocks = render(source, messages, tokenizer, tools=tools)
    ids, offsets = tokenizer.encode(text)
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)  # [tokens, (start, end)] in characters of text
    if not has_generation_markers(source):
        return ids, text, turn_token_spans(source, messages, tokenizer, tools, text, ids, offsets)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    keys = assistant if len(blocks) == len(assistant) else [-1 - k for k in range(len(blocks))]
    return ids, text, {key: _overlapping(offsets, lo, hi) for key, (lo, hi) in zip(keys, blocks)}


def encode_chat(source: str, messages: list[dict], tokenizer, train_on_all: bool = False,
                tools: list[dict] | None = None, turn_weights: list[float | None] | None = None,
                ) -> tuple[list[int], np.ndarray]:
    """Token ids of the rendered conversation and each token's float32 weight as a target (0: not
    trained). Assistant turns weigh 1 unless `turn_weights[i]` (a message's `train`/`weight`) says
    otherwise; with `train_on_all` every token weighs 1."""
    if train_on_all:
        ids = tokenizer.encode(render(source, messages, tokenizer, tools=tools)[0])[0]
        return ids, np.ones(len(ids), np.float32)
    ids, _, spans = assistant_turns(source, messages, tokenizer, tools)
    weight = {i: 1.0 if turn_weights is None or turn_weights[i] is None else turn_weights[i]
              for i, m in enumerate(messages) if m["role"] == "assistant"}
    if any(key < 0 for key in spans) and set(weight.values()) != {1.0}:
        raise TemplateError(f"per-message weights need one {{% generation %}} block per assistant turn; the "
                            f"template rendered {len(spans)} for {len(weight)} turns")
    weights = np.zeros(len(ids), np.float32)
    for key, (a, b) in spans.items():
        weights[a:b] = weight.get(key, 1.0)
    if not weights.any() and not any(w == 0 for w in weight.values()):
        raise TemplateError("the assistant mask is empty: no assistant tokens to train on")
    return ids, weights
