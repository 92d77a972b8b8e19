"""The named choices a config may take, in one place that imports nothing heavy (the config module reads
them before jax starts; the model and the CLI check against the same tuples)."""

from __future__ import annotations

# models/attention/: "auto" picks splash on TPU, cuDNN on GPU (bf16/fp16), else the blocked XLA path.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "reference", "cudnn", "splash")
# models/attention/split.py: attention over a sequence split on the mesh's context axis (all-gather keys and values,
# or pass them around a ring), and the order of positions on the devices (zigzag: causal load balance).
CONTEXT_SCHEMES = ("allgather", "ring")
# The default by measurement (benchmarks/README.md): as fast as all-gather on the CPU and it never holds
# a whole row's keys, values and their float32 gradients (llama3.1-8b, 262,144 positions: 63.69 vs 87.38 GiB).
DEFAULT_CONTEXT_SCHEME = "ring"
CONTEXT_LAYOUTS = ("zigzag", "contiguous")
# models/decoder.py: what a decoder layer saves for the backward pass (none: everything; full: nothing).
REMAT_POLICIES = ("none", "full", "save_dots")
# The projections LoRA may adapt, by our name: our module and weight, and the transformers module it is in
# a Hugging Face checkpoint (whose last part is the name PEFT users know: lora.targets accepts it too).
PROJECTIONS = {
    "q": ("attn", "wq", "self_attn.q_proj"), "k": ("attn", "wk", "self_attn.k_proj"),
    "v": ("attn", "wv", "self_attn.v_proj"), "o": ("attn", "wo", "self_attn.o_proj"),
    "gate": ("mlp", "w_gate", "mlp.gate_proj"), "up": ("mlp", "w_up", "mlp.up_proj"),
    "down": ("mlp", "w_down", "mlp.down_proj"),
}
LORA_TARGETS = tuple(PROJECTIONS)
PEFT_TARGETS = {name: hf.rsplit(".", 1)[1] for name, (_, _, hf) in PROJECTIONS.items()}  # q -> q_proj, ...
LORA_MLP_TARGETS = ("gate", "up", "down")  # a mixture of experts has no adapters on these (models/config.py)
# How LoRA's frozen base is stored: int8 and nf4 (QLoRA) quantize its projection weights (models/quant.py).
LORA_BASE_DTYPES = ("bfloat16", "float32", "int8", "nf4")
# models/config.py: the gated MLP's activation (SwiGLU's silu; Gemma's GeGLU with the tanh GELU).
ACTIVATIONS = ("silu", "gelu_tanh")
# models/config.py: a layer's attention, as transformers' `layer_types` names it ("linear_attention": a Gated
# DeltaNet layer, models/gated_deltanet.py).
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")
