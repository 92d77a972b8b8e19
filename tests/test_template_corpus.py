"""Every real chat template of tests/chat_templates/ on every chat shape: the token ids equal transformers'
`apply_chat_template`, and the trained tokens equal a reference written here, per template, from reading
it: the text that opens an assistant turn (the header the model is prompted with) and the text that closes
it. A shape the template cannot express is refused, by transformers and by us alike; the few that
transformers renders and we refuse are listed with the reason, which the test checks.
"""

import json

import numpy as np
import pytest
from optional import optional
from template_corpus import SHAPES, template_names, transformers_ids, write_tokenizer

from sft_sharded.data.formats import RecordError, RowSkipped, encode_record
from sft_sharded.data.tokenizers import HFTokenizer

IM = (("<|im_start|>assistant\n",), ("<|im_end|>",))
IM_THINK = (("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n"), ("<|im_end|>",))
LLAMA = (("<|start_header_id|>assistant<|end_header_id|>\n\n",), ("<|eot_id|>", "<|eom_id|>"))
MISTRAL = (("[/INST]", "[/TOOL_RESULTS]"), ("</s>",))
KIMI = (("<|im_assistant|>assistant<|im_middle|>",), ("<|im_end|>",))
EOS_DS = ("<｜end▁of▁sentence｜>",)
DS_AFTER_TOOL = ("<｜tool▁outputs▁end｜>", "<｜tool▁output▁end｜>", "</function_results>\n\n")  # no header there
GRANITE = (("<|start_of_role|>assistant<|end_of_role|>",), ("<|end_of_text|>",))
GLM = ("<|user|>", "<|observation|>")  # GLM closes a turn with the next one's token (a stop token of the model)
GIGA = (("assistant<|role_sep|>\n",), ("<|message_sep|>",))

# template -> (headers, closers): a turn starts after the last header before its own text and ends with the
# first closer after it (or, with none, at the end of its own text). None: the template has {% generation %}
# blocks and transformers' assistant mask is the reference.
TURNS = {
    "Apertus-8B-Instruct": (("<|assistant_start|>",), ("<|assistant_end|>",)),
    "Apriel-1.6-15b-Thinker-fixed": (("<|begin_assistant|>\n", "<|begin_assistant|>\nHere are my reasoning steps:\n"),
                                     ("<|end|>",)),
    "Bielik-11B-v3.0-Instruct": IM,
    "ByteDance-Seed-OSS": (("<seed:bos>assistant\n",), ("<seed:eos>",)),
    "Cohere2MoE": (("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                    "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_THINKING|>"), ("<|END_OF_TURN_TOKEN|>",)),
    "CohereForAI-c4ai-command-r-plus-tool_use": (("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",), ("<|END_OF_TURN_TOKEN|>",)),
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": ((), ()),
    "GLM-4.6": (("<|assistant|>",), GLM),
    "GLM-4.7-Flash": (("<|assistant|>", "<|assistant|><think>"), GLM),
    "GigaChat3-10B-A1.8B": GIGA,
    "GigaChat3.1-10B-A1.8B": GIGA,
    "HuggingFaceTB-SmolLM3-3B": IM,
    "Kimi-K2-Instruct": KIMI,
    "Kimi-K2-Thinking": KIMI,
    "Kimi-K3": (('<|open|>message role="assistant"<|sep|><|open|>think<|sep|>',), ("<|end_of_msg|>",)),
    "LFM2-8B-A1B": IM,
    # Its {% generation %} block is the content and "<|im_end|>\n"; transformers' assistant mask of it starts
    # one token early (the "\n" of the header), so the reference is the block's text.
    "LFM2.5-8B-A1B": (("<|im_start|>assistant\n",), ("<|im_end|>\n",)),
    "LFM2.5-Instruct": IM,
    "MiMo-VL": IM,
    "MiniMax-M1": (("<beginning_of_sentence>ai name=assistant\n",), ("<end_of_sentence>",)),
    "MiniMax-M2": (("]~b]ai\n", "]~b]ai\n<think>\n"), ("[e~[",)),
    "MiniMax-M3": (("]~b]ai\n",), ("[e~[",)),
    "Mistral-Small-3.2-24B-Instruct-2506": MISTRAL,
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": (("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>",
                                            "<|im_start|>assistant\n<think>\n"), ("<|im_end|>",)),
    "NVIDIA-Nemotron-Nano-v2": (("<SPECIAL_11>Assistant\n", "<SPECIAL_11>Assistant\n<think>\n"), ("<SPECIAL_12>",)),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": IM,
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": IM,
    "Qwen-QwQ-32B": IM,
    "Qwen-Qwen2.5-7B-Instruct": IM,
    "Qwen-Qwen3-0.6B": IM,
    "Qwen3-Coder": IM,
    "Qwen3.5-4B": IM_THINK,
    "Reka-Edge": (("<sep>assistant:",), ("<sep>",)),
    "Spark2.5": (("<|Bot|>", "<|Bot|><think>"), EOS_DS),
    "StepFun3.5-Flash": IM_THINK,
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": (("<｜Assistant｜>", *DS_AFTER_TOOL), EOS_DS),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (("<｜Assistant｜>", *DS_AFTER_TOOL), EOS_DS),
    "deepseek-ai-DeepSeek-V3.1": (("<｜Assistant｜>", "<｜Assistant｜><think></think>", *DS_AFTER_TOOL), EOS_DS),
    "deepseek-ai-DeepSeek-V3.2": (("<｜Assistant｜>", *DS_AFTER_TOOL), EOS_DS),
    "deepseek-ai-DeepSeek-V4": (("<｜Assistant｜></think>", *DS_AFTER_TOOL), EOS_DS),
    "deepseek-ai-DeepSeek-V4-Flash-0731": (("<｜Assistant｜></think>", *DS_AFTER_TOOL), EOS_DS),
    "fireworks-ai-llama-3-firefunction-v2": LLAMA,
    "google-gemma-2-2b-it": (("<start_of_turn>model\n",), ("<end_of_turn>",)),
    # Gemma 4 writes a tool's result inside the model's turn: the call ends with <|tool_response>, the answer
    # follows the result.
    "google-gemma-4-31B-it": (("<|turn>model\n", "<tool_response|>"), ("<turn|>", "<|tool_response>")),
    "google-gemma-4-31B-it-interleaved": (("<|turn>model\n",), ("<turn|>",)),
    "ibm-granite-granite-3.3-2B-Instruct": GRANITE,
    "ibm-granite-granite-4.0": GRANITE,
    "ibm-granite-granite-4.1": GRANITE,
    "inclusionai-ling-3.0-flash": (("<role>ASSISTANT</role>\n<think>",), ("<|role_end|>",)),
    "llama-cpp-deepseek-r1": (("<｜Assistant｜>", *DS_AFTER_TOOL), EOS_DS),
    "llama-cpp-rwkv-world": (("Assistant:",), ()),
    "meetkai-functionary-medium-v3.1": LLAMA,
    "meetkai-functionary-medium-v3.2": (("<|start_header_id|>assistant<|end_header_id|>\n\n>>>",), LLAMA[1]),
    "meta-llama-Llama-3.1-8B-Instruct": LLAMA,
    "meta-llama-Llama-3.2-3B-Instruct": LLAMA,
    "meta-llama-Llama-3.3-70B-Instruct": LLAMA,
    "microsoft-Phi-3.5-mini-instruct": (("<|assistant|>\n",), ("<|end|>",)),
    "mistralai-Ministral-3-14B-Reasoning-2512": MISTRAL,
    "mistralai-Mistral-Nemo-Instruct-2407": MISTRAL,
    "moonshotai-Kimi-K2": KIMI,
    "muse-glimmer": (("<|start|>assistant",), ("<|eot|>",)),
    "openai-gpt-oss-120b": (("<|start|>assistant",), ("<|end|>", "<|return|>", "<|call|>")),
    "openbmb-MiniCPM5-1B": IM,
    "poolside-Laguna-S-2.1": None,
    "poolside-Laguna-XS-2.1": None,
    "poolside-Laguna-XS.2": None,
    "tencent-Hy3": (("<｜hy_Assistant:opensource｜><think:opensource></think:opensource>",
                     "<｜hy_Assistant:opensource｜><think:opensource>"), ("<｜hy_eos:opensource｜>",)),
    "unsloth-Apriel-1.5": (("<|assistant|>\n",), ("<|end|>\n</s>", "<|end|>")),
    "unsloth-mistral-Devstral-Small-2507": MISTRAL,
    "upstage-Solar-Open-100B": (("<|begin|>assistant",), ("<|end|>", "<|calls|>")),
}

# Shapes transformers renders that are refused here, and why (each checked against the refusal's text).
REFUSED = {
    ("Apertus-8B-Instruct", "tool_call"): "header follow the earlier messages",  # the answer shares the tool's block
    ("CohereForAI-c4ai-command-r-plus-tool_use", "tool_call"): "close the turn before the next",  # no end of turn
    ("Reka-Edge", "tool_call"): "rewrites the message text",  # re-serialises the arguments
    ("mistralai-Mistral-Nemo-Instruct-2407", "system"): "header follow the earlier messages",  # system moves
    ("mistralai-Mistral-Nemo-Instruct-2407", "multi_turn"): "header follow the earlier messages",
    # Every conversation: the template always ends with an open assistant turn, finished or not.
    **{("CohereForAI-c4ai-command-r7b-12-2024-tool_use", s): "header follow the earlier messages" for s in SHAPES},
}
# Turns the reference reads differently, each with the span the rule gives and why:
# - R1-Distill-Qwen renders a tool-calling message as two assistant segments (the calls, then an empty
#   answer): both are the message's, up to the tool outputs.
# - Apriel 1.5 closes every assistant turn with "<|end|>\n</s>"; a turn it renders differently as the last
#   turn (the tool call) is closed by its first closing token, "<|end|>".
SPECIAL_CASES = {("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "tool_call"): (0, "<｜tool▁outputs▁begin｜>", 0),
                 ("unsloth-Apriel-1.5", "tool_call"): (0, "<|end|>", len("<|end|>"))}


def _own_words(message: dict) -> list[str]:
    words = [message.get("content") or "", message.get("reasoning_content") or "", message.get("thinking") or ""]
    if message.get("tool_calls"):
        words.append("Paris, France")
    return [w for w in words if w]


def reference_spans(text: str, messages: list[dict], headers, closers) -> list[tuple[int, int]]:
    """Character spans of the assistant turns by the template's header and closing texts. A turn's own text
    lies between the text of the message before it and the text of the message after it."""
    spans, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            at = text.find(message["content"], pos) if message["content"] else -1
            pos = at + len(message["content"]) if at >= 0 else pos
            continue
        after = messages[i + 1]["content"] if i + 1 < len(messages) else ""
        limit = text.find(after, pos) if after and text.find(after, pos) >= 0 else len(text)
        found = [(text.find(w, pos, limit), w) for w in _own_words(message) if text.find(w, pos, limit) >= 0]
        first = min((at for at, _ in found), default=None)
        if first is None:  # the template writes none of the turn's text (tool calls it does not render)
            first = min(text.find(h, pos) + len(h) for h in headers if text.find(h, pos) >= 0)
        start = max(text.rfind(h, pos, first) + len(h) for h in headers if text.rfind(h, pos, first) >= 0)
        own_end = max((at + len(w) for at, w in found), default=start)
        ends = sorted((text.find(c, own_end, limit), -len(c)) for c in closers if text.find(c, own_end, limit) >= 0)
        end = ends[0][0] - ends[0][1] if ends else own_end
        spans.append((start, end))
        pos = end
    return spans


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {name: write_tokenizer(root / name, name) for name in template_names()}


def test_every_template_of_the_collection_has_a_reference():
    assert sorted(TURNS) == template_names()


@pytest.mark.parametrize("name", template_names())
def test_real_template_ids_equal_transformers_and_trained_tokens_equal_the_reference(name, tokenizers):
    PreTrainedTokenizerFast = optional("transformers").PreTrainedTokenizerFast

    directory = tokenizers[name]
    tok = HFTokenizer(directory)
    outcomes = {}
    for shape, record in SHAPES.items():
        expected = transformers_ids(directory, record)
        try:
            example = encode_record(json.loads(json.dumps(record)), tok)
        except (RowSkipped, RecordError) as err:  # RecordError: the sandbox stopped the template
            if isinstance(expected, str):
                outcomes[shape] = "both refuse"
                continue
            assert REFUSED.get((name, shape)) in str(err), (shape, str(err))
            outcomes[shape] = "refused"
            continue
        assert not isinstance(expected, str), f"{shape}: trained a chat transformers refuses ({expected})"
        assert (name, shape) not in REFUSED, f"{shape}: expected a refusal"
        assert example.tokens.tolist() == expected, shape
        ids = example.tokens.tolist()
        if TURNS[name] is None:
            hf = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
            out = hf.apply_chat_template(record["messages"], tools=record.get("tools"), chat_template=tok.chat_template,
                                         tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            want = np.array(out["assistant_masks"], bool)
        else:
            text = tok._tok.decode(ids, skip_special_tokens=False)
            offsets = tok.encode(text)[1]
            assert tok.encode(text)[0] == ids, shape  # the text decodes and re-encodes to the same ids
            spans = reference_spans(text, record["messages"], *TURNS[name])
            if (name, shape) in SPECIAL_CASES:
                turn, until, past = SPECIAL_CASES[name, shape]
                lo, _ = spans[turn]
                spans[turn] = (lo, text.find(until, lo) + past)
            starts = np.array([o[0] for o in offsets])
            want = np.zeros(len(ids), bool)
            for lo, hi in spans:
                want |= (starts >= lo) & (starts < hi)
        want[0] = False  # the first token is never a target
        got = example.mask
        assert got.tolist() == want.tolist(), (shape, tok._tok.decode([t for t, m in zip(ids, got) if m]),
                                               tok._tok.decode([t for t, m in zip(ids, want) if m]))
        outcomes[shape] = "exact"
    assert set(outcomes) == set(SHAPES)


def _trained_text(name, tokenizers, record) -> list[str]:
    tok = HFTokenizer(tokenizers[name])
    example = encode_record(json.loads(json.dumps(record)), tok)
    pieces, run = [], []
    for token, trained in zip(example.tokens.tolist(), example.mask.tolist()):
        if trained:
            run.append(token)
        elif run:
            pieces, run = [*pieces, tok._tok.decode(run, skip_special_tokens=False)], []
    return pieces + ([tok._tok.decode(run, skip_special_tokens=False)] if run else [])


def test_mistral_nemo_never_trains_user_text_it_refuses_a_moved_system_prompt(tokenizers):
    # Its template writes the system prompt before the *last* user message only: no exact turn exists.
    with pytest.raises(RowSkipped, match=r"assistant turn 2 not locatable: .*earlier messages.* in the chat template"):
        _trained_text("mistralai-Mistral-Nemo-Instruct-2407", tokenizers, SHAPES["system"])
    assert _trained_text("mistralai-Mistral-Nemo-Instruct-2407", tokenizers, SHAPES["tool_call"]) == [
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris, France"}, "id": "call12345"}]</s>',
        "Paris is sunny, 22 degrees.</s>"]


def test_gpt_oss_turns_end_where_harmony_ends_them(tokenizers):
    # An earlier turn ends with <|end|>, the last with <|return|>; reasoning and answer are one turn.
    assert _trained_text("openai-gpt-oss-120b", tokenizers, SHAPES["reasoning"]) == [
        "<|channel|>final<|message|>It is four.<|end|>",
        "<|channel|>analysis<|message|>Four times three is twelve.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Twelve, exactly.<|return|>"]
    assert _trained_text("openai-gpt-oss-120b", tokenizers, SHAPES["tool_call"]) == [
        ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris, France"}<|call|>',
        "<|channel|>final<|message|>Paris is sunny, 22 degrees.<|return|>"]
