"""Chat templates rendered as transformers' `apply_chat_template` renders them, in jinja2's immutable sandbox.

The environment has what transformers gives a template (its `chat_template_utils`): `trim_blocks` and
`lstrip_blocks`, the loop controls (`{% break %}`, `{% continue %}`), `raise_exception`, `strftime_now`,
`tojson` with `ensure_ascii`, `indent`, `separators` and `sort_keys`, `namespace` refusing underscore names,
`dict`, and `{% generation %}` blocks. The data it gets is transformers' too: keys whose value is None are
dropped, a message's reasoning under any of `reasoning_content`, `thinking` or `reasoning` is passed under
`reasoning_content` and `thinking` as well, `tools` and `documents` are always defined (None when absent),
and the tokenizer's named special tokens (`bos_token`, `eos_token`, ...) are variables. Where a template
renders differently here than there, it is a bug here.

`{% generation %}` blocks wrap their output in two private-use sentinel characters, found and removed
after rendering (transformers records the same spans as indices).
"""

from __future__ import annotations

import datetime
import functools
import json
import re

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from sft_sharded.errors import UserError

START, END = "\ue000", "\ue001"  # around a {% generation %} block's output
# Marks that turns.py puts into message text to find it in a rendering; all four are reserved.
PREV_END, OWN_START, OWN_END, NEXT_START = "\ue002", "\ue003", "\ue004", "\ue005"
RESERVED = (START, END, PREV_END, OWN_START, OWN_END, NEXT_START)
# Found with a regular expression, not a loop over characters: a rendering is scanned several times per
# conversation, and a Python loop over every character was the pipeline's largest cost on long chats.
RESERVED_RE = re.compile("[" + "".join(RESERVED) + "]")
_BLOCK_RE = re.compile(f"[{START}{END}]")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # transformers' order of preference


class TemplateError(ValueError):
    """A conversation the template cannot render or mask (reported per row, never silently trained)."""


class TemplateSyntax(UserError):
    """The template itself does not parse: every record would fail, so the run stops naming the line."""


class _Generation(Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

    def _wrap(self, caller):
        return START + caller() + END


# What a plain dict answers to as an attribute (its methods and dunders); any other name only as a key.
_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Sandbox(ImmutableSandboxedEnvironment):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._safe: dict[tuple[type, str], bool] = {}

    def getattr(self, obj, attribute):
        # `message.content`: jinja tries the attribute first and reaches the key through a raised
        # AttributeError, for every field a template reads. A plain dict has no attribute of any other name
        # than dict's own, so for those names the key first is the same lookup, without the exception.
        if type(obj) is dict and isinstance(attribute, str) and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def is_safe_attribute(self, obj, attr, value):
        # jinja's answer depends on the object's type (isinstance checks) and the attribute's name only, and
        # templates ask it hundreds of times per conversation (a third of a long chat's encoding): cached.
        if not isinstance(attr, str):
            return super().is_safe_attribute(obj, attr, value)
        key = (type(obj), attr)
        if key not in self._safe:
            self._safe[key] = super().is_safe_attribute(obj, attr, value)
        return self._safe[key]

    def unsafe_undefined(self, obj, attribute):
        # The default returns an Undefined that fails only when used; fail at once, naming the attribute.
        raise SecurityError(f"chat template tried to access {attribute!r} of a {type(obj).__name__} object")


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace without underscore attributes (transformers refuses them: a way into internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat template stored the underscore attribute {name!r} on a namespace")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the class itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise(message):
    raise TemplateError(f"chat template raised: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers' (and so every template's author's) does not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now, namespace=_Namespace, dict=_Dict())
    return env.from_string(source)


@functools.lru_cache(maxsize=16)
def _globals(template: jinja2.Template) -> dict:
    """The compiled template's globals as one plain dict. jinja's `render` merges them out of a ChainMap into
    every render's context (over a third of a short chat's render time); they never change once compiled."""
    return dict(template.globals)


def _render(template: jinja2.Template, variables: dict) -> str:
    """`template.render(**variables)`, with the globals merged once per template: the context jinja's
    `render` makes (its public `new_context`, shared: given the merged dict as is), rendered as there."""
    context = template.new_context({**_globals(template), **variables}, shared=True)
    try:
        return template.environment.concat(template.root_render_func(context))
    except Exception:  # noqa: BLE001 - re-raised by jinja with the template's own lines in the traceback
        template.environment.handle_exception()


@functools.lru_cache(maxsize=16)  # asked once per conversation, of a template that may be thousands of characters
def has_generation_markers(source: str) -> bool:
    return "{% generation %}" in source.replace("{%-", "{%").replace("-%}", "%}")


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers hands them to a template: None values dropped, the reasoning under every
    name a template reads."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_raw(source: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> str:
    """The template's output as it is, sentinels included; `messages` may carry turns.py's marks."""
    specials = getattr(tokenizer, "special_tokens_map", None) or {
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    variables = {k: v for k, v in specials.items() if v is not None}
    try:
        template = compile_template(source)
    except jinja2.TemplateSyntaxError as err:
        name = getattr(tokenizer, "template_name", "the chat template")
        raise TemplateSyntax(f"{name}: line {err.lineno}: {err.message}") from None
    try:
        return _render(template, dict(messages=template_messages(messages), tools=tools, documents=None,
                                      add_generation_prompt=add_generation_prompt, **variables))
    except (SecurityError, TemplateError):
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
        # What the template does with a conversation it was not written for (a list where it adds strings,
        # a missing key) is this row's problem, reported with the row.
        hint = ("; it cannot take content as a list of parts: give each message's content as a string"
                if isinstance(err, TypeError) and any(isinstance(m.get("content"), list) for m in messages) else "")
        raise TemplateError(f"chat template failed: {type(err).__name__}: {err}{hint}") from None


def check_reserved(messages: list[dict], tools) -> None:
    if RESERVED_RE.search(json.dumps([messages, tools], ensure_ascii=False)):
        raise TemplateError("the conversation contains reserved characters U+E000..U+E005")


def render_text(source: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False,
                tools: list[dict] | None = None) -> str:
    """The rendered text alone, for messages `render` has already checked (turns.py renders one
    conversation's prefixes many times)."""
    return render_raw(source, messages, tokenizer, add_generation_prompt, tools).replace(START, "").replace(END, "")


def strip_marks(raw: str, marks: re.Pattern) -> tuple[str, list[tuple[str, int]]]:
    """`raw` without the characters `marks` matches, and each one's (character, position in that text)."""
    found = [(mark.group(), mark.start() - removed) for removed, mark in enumerate(marks.finditer(raw))]
    return marks.sub("", raw), found


def render(source: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans inside `{% generation %}` blocks (empty without markers)."""
    check_reserved(messages, tools)
    text, sentinels = strip_marks(render_raw(source, messages, tokenizer, add_generation_prompt, tools), _BLOCK_RE)
    spans, opened = [], None
    for sentinel, pos in sentinels:
        if sentinel == START:
            opened = pos
        else:
            spans.append((opened, pos))
            opened = None
    return text, spans
