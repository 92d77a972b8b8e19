"""Greedy decoding with a KV cache, one jitted function under the trainer's mesh.

Prompts are left-padded to a common length (padding is segment 0, invisible to real tokens; RoPE
positions count real tokens only), prefilled in one call, then decoded one token per step in a
`lax.fori_loop`. Stop tokens are applied on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft_sharded.parallel import sharding
from sft_sharded.models.decoder import Decoder, init_cache
from sft_sharded.data.formats import chat_messages
from sft_sharded.data.templates import TemplateError
from sft_sharded.data.tokenizers import bos_ids
from sft_sharded.data.turns import assistant_turns


def _generate(model: Decoder, params, ids_BxP, segment_ids_BxP, max_new_tokens: int):
    # A KV cache grows one position at a time: the sequence stays whole (a context axis splits rows' work
    # in training only).
    with nn.logical_axis_rules(sharding.whole_sequence(nn.get_logical_axis_rules())):
        return _generate_whole(model, params, ids_BxP, segment_ids_BxP, max_new_tokens)


def _generate_whole(model: Decoder, params, ids_BxP, segment_ids_BxP, max_new_tokens: int):
    cfg = model.config
    batch, prompt_len = ids_BxP.shape
    cache = init_cache(cfg, batch, prompt_len + max_new_tokens)
    positions_BxP = jnp.maximum(jnp.cumsum(segment_ids_BxP, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = model.apply({"params": params}, ids_BxP, positions_BxP, segment_ids_BxP, cache, method="decode")
    token_B = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    next_pos_B = positions_BxP[:, -1] + 1
    out_BxN = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token_B)

    def step(i, carry):
        token_B, out_BxN, cache = carry
        logits, cache = model.apply(
            {"params": params}, token_B[:, None], (next_pos_B + i - 1)[:, None],
            jnp.ones((batch, 1), jnp.int32), cache, method="decode",
        )
        token_B = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return token_B, out_BxN.at[:, i].set(token_B), cache

    _, out_BxN, _ = jax.lax.fori_loop(1, max_new_tokens, step, (token_B, out_BxN, cache))
    return out_BxN


def greedy_generate(trainer, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuations of token-id prompts (cut before the first stop id), on the trainer's mesh."""
    dp = sharding.data_parallel_size(trainer.mesh)
    rows = -(-len(prompts) // dp) * dp
    prompt_len = max(len(p) for p in prompts)
    ids = np.zeros((rows, prompt_len), np.int32)
    segments = np.zeros((rows, prompt_len), np.int32)
    for r, prompt in enumerate(prompts):
        ids[r, prompt_len - len(prompt) :] = prompt
        segments[r, prompt_len - len(prompt) :] = 1
    segments[len(prompts) :, -1] = 1  # filler rows: one visible token so nothing is empty
    params_sh = sharding.shardings_of(params)
    fn = _compiled(trainer, max_new_tokens, jax.tree.structure(params_sh), tuple(jax.tree.leaves(params_sh)))
    batch_sh = sharding.row_sharding(trainer.mesh)
    with trainer.activate():
        out = fn(params, sharding.host_to_global(ids, batch_sh), sharding.host_to_global(segments, batch_sh))
    out = sharding.global_to_host(out)
    results = []
    for r in range(len(prompts)):
        tokens = out[r].tolist()
        for i, token in enumerate(tokens):
            if token in stop_ids:
                tokens = tokens[:i]
                break
        results.append(tokens)
    return results


@functools.lru_cache(maxsize=8)
def _compiled(trainer, max_new_tokens: int, params_treedef, params_shardings: tuple):
    """The generation function for params laid out as given (the cache key is their sharding)."""
    batch_sh = sharding.row_sharding(trainer.mesh)
    return jax.jit(
        functools.partial(_generate, trainer.model, max_new_tokens=max_new_tokens),
        in_shardings=(jax.tree.unflatten(params_treedef, params_shardings), batch_sh, batch_sh),
        out_shardings=batch_sh,
    )


def prompt_and_answer(record: dict, tokenizer) -> tuple[list[int], str] | None:
    """The prompt tokens and the reference answer of a chat or prompt/completion record (None for text, and
    for a chat whose last assistant turn the template cannot locate). A chat's prompt is the whole
    conversation before its last assistant turn, as the template renders the whole conversation, and the
    reference is that turn as it renders it (reasoning and tool calls included), decoded as a generation is."""
    if "messages" in record and record["messages"][-1]["role"] == "assistant":
        messages, _ = chat_messages(record, "record")  # training keys left out
        try:
            ids, _, spans = assistant_turns(tokenizer.chat_template, messages, tokenizer, record.get("tools"))
        except TemplateError:
            return None
        start, end = spans[max(spans, key=lambda k: spans[k][0])]
        return ids[:start], tokenizer.decode(ids[start:end])
    if "prompt" in record and "completion" in record:
        return bos_ids(tokenizer) + tokenizer.encode(record["prompt"])[0], record["completion"]
    return None


def exact_match(trainer, params, records: Sequence[dict], tokenizer, max_new_tokens: int,
                batch_rows: int = 64) -> tuple[float, list[dict[str, str]]]:
    """Share of records whose greedy answer equals the reference exactly, and for each scored record its
    {"prompt" (as the model saw it, decoded), "reference", "generation"}."""
    pairs = [p for p in (prompt_and_answer(r, tokenizer) for r in records) if p is not None]
    if not pairs:
        return float("nan"), []
    results = []
    for i in range(0, len(pairs), batch_rows):
        chunk = pairs[i : i + batch_rows]
        outs = greedy_generate(trainer, params, [p for p, _ in chunk], max_new_tokens, tokenizer.stop_ids)
        results += [{"prompt": tokenizer.decode(prompt), "reference": answer, "generation": tokenizer.decode(out)}
                    for (prompt, answer), out in zip(chunk, outs)]
    return sum(r["reference"] == r["generation"] for r in results) / len(results), results
