"""Tokenizers: a built-in byte tokenizer (no files) and a Hugging Face `tokenizer.json` wrapper.

Both give `encode(text) -> (ids, char_offsets)` so chat-template assistant spans (in characters) map to
tokens, and both know their special tokens by text so a rendered template's `<|end|>` becomes one id.
Padding is never recognised by id anywhere in the pipeline: masks travel next to the tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sft_sharded.rundir import paths
from sft_sharded.errors import MissingFileError, UserError

# The built-in chat template: roles as special tokens, each turn closed by <|end|>, which is trained on
# assistant turns. `{% generation %}` marks what the assistant says (the trained span).
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>"
    "{% if message.role == 'assistant' %}{% generation %}{{ message.content }}<|end|>{% endgeneration %}"
    "{% else %}{{ message.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES), each a variable of a chat template.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ByteTokenizer:
    """ids 0..7 are special (pad, bos, eos, the chat roles and <|end|>); byte b is id b + 8."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<unused>")

    def __init__(self):
        self.special_ids = {tok: i for i, tok in enumerate(self.SPECIALS)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.offset = len(self.SPECIALS)
        self.chat_template = BYTE_CHAT_TEMPLATE
        self.bos_token, self.eos_token = "<bos>", "<eos>"
        self.stop_ids = (self.eos_id, self.special_ids["<|end|>"])
        self.special_token_ids = frozenset(self.special_ids.values())
        self.special_tokens_map = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        self.template_name = "the built-in chat template"
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.SPECIALS) + ")")
        # byte -> its id, for ASCII bytes (ids below 256, so a bytes table); the entries past 127 are never read
        self._shift = bytes(min(byte + self.offset, 255) for byte in range(256))

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets, pos = [], [], 0
        for piece in self._split.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
                offsets.append((pos, pos + len(piece)))
            elif piece.isascii():  # one byte per character: no per-character loop (the pipeline's hot path)
                ids.extend(piece.encode().translate(self._shift))  # bytes iterate as ints: byte + offset
                offsets.extend(zip(range(pos, pos + len(piece)), range(pos + 1, pos + len(piece) + 1)))
            else:
                for i, char in enumerate(piece):
                    for byte in char.encode("utf-8"):
                        ids.append(byte + self.offset)
                        offsets.append((pos + i, pos + i + 1))
            pos += len(piece)
        return ids, offsets

    def text_of(self, ids) -> str:
        """Every id's text, special tokens by name (what `sft-sharded data` shows)."""
        out = []
        for i in map(int, ids):
            out.append(self.SPECIALS[i] if i < self.offset else
                       bytes([i - self.offset]).decode("latin-1") if i < self.vocab_size else "\ufffd")
        return "".join(out).encode("latin-1", errors="replace").decode("utf-8", errors="replace")

    def decode(self, ids) -> str:
        """Text of the ids up to the first stop token; other special ids are dropped, and an id past the
        vocabulary (a model's vocab may be larger than 264) decodes as U+FFFD."""
        out = bytearray()
        for i in map(int, ids):
            if i in self.stop_ids:
                break
            if i >= self.vocab_size:
                out += "\ufffd".encode()
            elif i >= self.offset:
                out.append(i - self.offset)
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """`tokenizer.json` + `tokenizer_config.json` from a local directory (never remote code)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = paths.path(directory, "tokenizer.path")
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise MissingFileError(f"tokenizer.path={str(directory)!r}: no tokenizer.json in that directory")
        try:
            self._tok = Tokenizer.from_str(path.read_text())
        except Exception as err:  # noqa: BLE001 - the Rust library raises a bare Exception for any bad file
            raise UserError(f"{path}: not a tokenizer the tokenizers library can read ({err})") from None
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        pad_token = _token_text(config.get("pad_token"))
        # What transformers passes a template as variables: the named special tokens the config sets.
        self.special_tokens_map = {key: _token_text(config[key]) for key in SPECIAL_TOKEN_KEYS
                                   if _token_text(config.get(key)) is not None}
        self.special_token_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self.bos_id = self._id(self.bos_token, config_path)
        self.eos_id = self._id(self.eos_token, config_path)
        self.pad_id = self._id(pad_token, config_path) if pad_token else self.eos_id
        self.add_bos = bool(config.get("add_bos_token", self.bos_id is not None))
        self.chat_template = _default_template(config.get("chat_template"), config_path)
        self.template_name = f"the chat template of {config_path}"
        if self.chat_template is None and (directory / "chat_template.jinja").is_file():
            self.chat_template = (directory / "chat_template.jinja").read_text()
            self.template_name = str(directory / "chat_template.jinja")
        self.stop_ids = tuple(i for i in (self.eos_id, *self._generation_eos(directory)) if i is not None)
        self.stop_ids = tuple(dict.fromkeys(self.stop_ids))

    def _generation_eos(self, directory: Path) -> list[int]:
        """The model's generation_config.json eos ids: chat models stop at the turn end there (Gemma's
        <end_of_turn>, 106) while tokenizer_config.json names only <eos>."""
        path = directory / "generation_config.json"
        if not path.is_file():
            return []
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON: {err.msg} (line {err.lineno})") from None
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
            raise UserError(f"{path}: eos_token_id={json.dumps(eos)} must be ids of the tokenizer "
                            f"(< {self.vocab_size})")
        return ids

    def _id(self, token: str | None, where: Path) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise UserError(f"{where}: special token {token!r} is not in tokenizer.json's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)  # (start, end) characters of `text`

    def text_of(self, ids) -> str:
        """Every id's text, special tokens included (what `sft-sharded data` shows)."""
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def decode(self, ids) -> str:
        ids = list(map(int, ids))
        for stop in self.stop_ids:
            if stop in ids:
                ids = ids[: ids.index(stop)]
        return self._tok.decode(ids, skip_special_tokens=True)


def bos_ids(tokenizer) -> list[int]:
    """The BOS to put before a text or prompt: [bos] when the tokenizer has one and adds it, else []."""
    return [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) and tokenizer.bos_id is not None else []


def _default_template(value, where: Path) -> str | None:
    """tokenizer_config.json's chat_template: one template, or a list of named ones of which transformers
    uses "default" (the others, e.g. "tool_use", are chosen by name)."""
    if value is None or isinstance(value, str):
        return value
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)} if isinstance(value, list) else {}
    if "default" not in named:
        what = f"a list of templates named {sorted(map(str, named))} without 'default'" if named else "not a string"
        raise UserError(f"{where}: chat_template is {what}")
    return named["default"]


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(path: str | None):
    """The byte tokenizer when `path` is None, else the Hugging Face tokenizer in that directory."""
    return ByteTokenizer() if path is None else HFTokenizer(path)
