"""A tiny real Hugging Face tokenizer (BPE trained here on a few lines) written to a directory."""

import json
from pathlib import Path

CHATML = (  # ChatML as Qwen writes it; jinja's trim_blocks eats newlines after tags, so they are strings
    r"{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    r"{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    r"{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LINES = ["the cat sat on the mat", "hello world, hello there", "reverse the digits 12345",
         "user asks and the assistant answers", "sort: 3 1 2 -> 1 2 3"] * 20


def write_hf_tokenizer(directory: Path, chat_template: str = CHATML, pad_token: str = "</s>",
                       specials: tuple[str, ...] = ("<|im_start|>", "<|im_end|>"), eos_token: str = "</s>") -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<s>", "</s>", *specials])
    tok.train_from_iterator(LINES, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": eos_token}, "pad_token": pad_token,
              "chat_template": chat_template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
