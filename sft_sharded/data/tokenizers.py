"""Tokenizers. The built-in byte tokenizer needs no files: ids 0..2 are special, byte b is id b + 3."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    offset: int = 3

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        """Bytes of the non-special ids; stops at the first EOS."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= self.offset:
                out.append(i - self.offset)
        return out.decode("utf-8", errors="replace")
