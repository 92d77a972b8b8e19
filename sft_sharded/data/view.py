"""Records as the model is trained on them, for `sft-sharded data`: the tokens' text with the trained
targets marked (rich colours on a terminal, `[[...]]` otherwise; a weight other than 1 follows as `x0.5`),
or as JSON (tokens, text pieces, weights) for scripts. A refused record says why.
"""

from __future__ import annotations

from sft_sharded.data.formats import Example


def token_pieces(tokenizer, ids, context: int = 8) -> list[str]:
    """Each token's share of the text: what decoding it after the `context` tokens before it adds (a
    tokenizer may decode a token differently at the start of a text, so never alone). A character split
    over byte tokens is the last one's (the earlier ones show nothing). Linear in the record's length."""
    pieces = []
    for i in range(len(ids)):
        window = list(ids[max(0, i - context) : i])
        before = tokenizer.text_of(window).rstrip("\ufffd")
        after = tokenizer.text_of([*window, ids[i]]).rstrip("\ufffd")
        pieces.append(after[len(before):] if after.startswith(before) else after)
    return pieces


def as_json(where: str, tokenizer, examples: list[Example], refused: str = "") -> dict:
    if refused:
        return {"where": where, "refused": refused}
    return {"where": where, "examples": [
        {"tokens": e.tokens.tolist(), "pieces": token_pieces(tokenizer, e.tokens.tolist()),
         "weights": e.target_weights().tolist(), "truncated": e.truncated} for e in examples]}


def as_text(record: dict, color: bool) -> list:
    """Lines (or rich Text objects with `color`) of one record from `as_json`."""
    if "refused" in record:
        return [f"{record['where']}: refused: {record['refused']}"]
    out = []
    for k, example in enumerate(record["examples"]):
        head = f"{record['where']}" + (f" (example {k + 1})" if len(record["examples"]) > 1 else "")
        head += " (cut at data.max_length)" if example["truncated"] else ""
        pieces, weights = example["pieces"], example["weights"]
        if color:
            from rich.text import Text

            text = Text(head + ":\n")
        else:
            text = head + ":\n"
        start = 0
        for i in range(1, len(weights) + 1):
            if i < len(weights) and weights[i] == weights[start]:
                continue
            chunk, w = "".join(pieces[start:i]), weights[start]
            if color:
                text.append(chunk, style=None if w == 0 else "bold green" if w == 1 else "bold yellow")
                if w not in (0, 1):
                    text.append(f"x{w:g}", style="dim")
            else:
                text += chunk if w == 0 else f"[[{chunk}]]" + ("" if w == 1 else f"x{w:g}")
            start = i
        out.append(text)
    return out
