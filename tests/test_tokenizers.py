"""The built-in byte tokenizer's ids and character offsets, against a reference walk written here: each special
token's text is one id, every other character is its UTF-8 bytes, each byte offset by the specials' count and
spanning its character."""

import pytest

from sft_sharded.data.tokenizers import ByteTokenizer


def _reference(text: str, specials: tuple[str, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    ids, offsets, pos = [], [], 0
    while pos < len(text):
        special = next((s for s in specials if text.startswith(s, pos)), None)
        if special is not None:
            ids.append(specials.index(special))
            offsets.append((pos, pos + len(special)))
            pos += len(special)
            continue
        for byte in text[pos].encode("utf-8"):
            ids.append(byte + len(specials))
            offsets.append((pos, pos + 1))
        pos += 1
    return ids, offsets


@pytest.mark.parametrize("text", [
    "",
    "plain ascii, digits 0123 and <tags> that are not special",
    "<|user|>rev:38172<|end|><|assistant|>27183<|end|>",
    "<|user|><|end|><bos><eos>",  # specials back to back: empty pieces between them
    "café 日本 🙂<|assistant|>naïve<|end|>tail",
])
def test_encode_matches_a_reference_walk(text):
    tok = ByteTokenizer()
    assert tok.encode(text) == _reference(text, ByteTokenizer.SPECIALS)


def test_ids_round_trip_through_text_of():
    tok = ByteTokenizer()
    ids, _ = tok.encode("<|user|>hi<|end|>")
    assert tok.text_of(ids) == "<|user|>hi<|end|>"
