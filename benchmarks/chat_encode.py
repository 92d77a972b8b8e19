"""Encoding speed of long multi-turn chats through real chat templates: render, locate every assistant turn,
tokenize, mask (`formats.encode_record`), in one process, no pipeline around it.

    python benchmarks/chat_encode.py [--records 300] [--templates Qwen-Qwen3-0.6B meta-llama-Llama-3.1-8B-Instruct]

Templates are those of tests/chat_templates (published with the models), each with the small BPE tokenizer
the template tests train for it (tests/template_corpus.py). Chats: a system prompt and 2-4 user/assistant
exchanges of 20-80 and 40-200 words (about 2,300 characters). Prints one JSON line per template.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from template_corpus import write_tokenizer  # noqa: E402  (the template tests' tokenizers)


def chats(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the a cat dog sat ran on under mat box quickly slowly why how what is are reverse sort".split()
    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(rng.randint(2, 4)):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(20, 80)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(40, 200)))})
        out.append({"messages": messages})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--templates", nargs="+", default=["Qwen-Qwen3-0.6B", "meta-llama-Llama-3.1-8B-Instruct"])
    args = parser.parse_args()
    from sft_sharded.data.formats import encode_record
    from sft_sharded.data.tokenizers import load_tokenizer

    records = chats(args.records)
    chars = sum(len(m["content"]) for r in records for m in r["messages"]) / len(records)
    for name in args.templates:
        with tempfile.TemporaryDirectory() as tmp:
            tok = load_tokenizer(str(write_tokenizer(Path(tmp), name)))
            encode_record(records[0], tok)  # compiles the template
            start, tokens = time.perf_counter(), 0
            for record in records:
                tokens += len(encode_record(record, tok).tokens)
            elapsed = time.perf_counter() - start
        print(json.dumps({"template": name, "ms_per_chat": round(elapsed / len(records) * 1e3, 3),
                          "chars_per_chat": round(chars), "tokens_per_s": round(tokens / elapsed)}))


if __name__ == "__main__":
    main()
