"""KV-cache greedy decoding equals re-running the full forward pass for every new token."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sft_sharded import Decoder, SFTTrainer, make_mesh
from sft_sharded.generate import greedy_generate


def naive_greedy(model, params, prompt, steps):
    tokens = list(prompt)
    apply = jax.jit(model.apply)
    for _ in range(steps):
        logits = apply({"params": params}, np.asarray([tokens], np.int32))
        tokens.append(int(np.argmax(logits[0, -1])))
    return tokens[len(prompt):]


@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_matches_full_recompute(tiny_config, scan):
    cfg = dataclasses.replace(tiny_config, scan_layers=scan, init_std=0.5)
    trainer = SFTTrainer(Decoder(cfg), optax.sgd(0.1), mesh=make_mesh(2, 2, 2))
    state = trainer.create_train_state(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, n).tolist() for n in (3, 7, 5)]  # ragged: left padding must not leak
    out = greedy_generate(trainer, state.params, prompts, max_new_tokens=6)
    params = jax.device_get(state.params)
    for prompt, generated in zip(prompts, out):
        assert generated == naive_greedy(Decoder(cfg), params, prompt, 6)


def test_stop_ids_cut_the_output(tiny_config):
    trainer = SFTTrainer(Decoder(dataclasses.replace(tiny_config, init_std=0.5)), optax.sgd(0.1), mesh=make_mesh(1, 8, 1))
    state = trainer.create_train_state(jax.random.key(1), jnp.zeros((8, 16), jnp.int32))
    full = greedy_generate(trainer, state.params, [[5, 6, 7]], max_new_tokens=6)[0]
    cut = greedy_generate(trainer, state.params, [[5, 6, 7]], max_new_tokens=6, stop_ids=(full[2],))[0]
    assert cut == full[: full.index(full[2])]


def test_held_out_prompt_of_a_tool_chat_is_the_conversation_before_its_last_turn(tmp_path):
    """The prompt is everything before the last assistant turn (the tool call and its result included) and
    the reference is that turn as the template renders it, reasoning included, decoded like a generation."""
    import json

    from test_templates import TOOL_CHAT, _qwen3_tools

    from sft_sharded.generate import prompt_and_answer

    tok, enc, end = _qwen3_tools(tmp_path)
    prompt, answer = prompt_and_answer(json.loads(json.dumps(TOOL_CHAT)), tok)
    call = '<tool_call>\n{"name": "sort", "arguments": {"xs": [3, 1, 2]}}\n</tool_call>'
    assert prompt == enc(
        '<|im_start|>system\n<tools>\n{"name": "sort", "parameters": {"type": "object"}}\n</tools><|im_end|>\n'
        "<|im_start|>user\nsort 3 1 2<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\nuse the tool\n</think>\n\n{call}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n[1, 2, 3]\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert answer == tok.decode(enc("<think>\nthe tool sorted\n</think>\n\n1 2 3"))
    assert "the tool sorted" in answer and answer.endswith("1 2 3")
