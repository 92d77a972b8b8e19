"""DecoderConfig: one decoder for every family we import (the records of `sft_sharded/families/`). The
families differ only in the fields below (norm placement, activation, scalings, soft-capping, q/k norms, the
window and RoPE of each layer), so a sharding rule or an attention change is made once, in `decoder.py`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from sft_sharded.choices import (ACTIVATIONS, ATTENTION_IMPLEMENTATIONS, CONTEXT_LAYOUTS, CONTEXT_SCHEMES,
                                 DEFAULT_CONTEXT_SCHEME, LAYER_TYPES, LORA_MLP_TARGETS, REMAT_POLICIES)
from sft_sharded.config import LoraConfig
from sft_sharded.models.rope import check_scaling


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 10_000.0
    # RoPE frequency scaling as sorted (key, value) pairs with a "rope_type" (rope.SCALING_TYPES: llama3,
    # linear, yarn). None: plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    # Gemma 3: sliding layers use this RoPE base, unscaled (global layers use rope_theta and rope_scaling).
    rope_local_theta: float | None = None
    rotary_dim: int | None = None  # RoPE on the first rotary_dim of each head only (partial rotary); None: all
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (SmolLM3's no_rope_layers)
    # (beta, positions): queries times 1 + beta * log(1 + floor(position / positions)) after RoPE, so that
    # attention stays sharp far past the trained length (Ministral 3's llama_4_scaling_beta). None: no scaling.
    query_position_scale: tuple[float, int] | None = None
    rms_norm_eps: float = 1e-5
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight), weights initialised at 0
    sandwich_norms: bool = False  # Gemma 2/3: a norm after attention and after the MLP too (4 per layer)
    post_norms: bool = False  # OLMo 2/3: norms after attention and after the MLP only, none before
    # RMSNorm multiplies by its weight in float32 and casts after (OLMo; Gemma's (1 + w) always does); Llama's
    # casts the normalised x to the compute dtype first.
    norm_scale_float32: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k before RoPE
    qk_norm_across_heads: bool = False  # OLMo 2/3: the q/k norm is over all heads together, not each head
    activation: str = "silu"  # of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size), rounded to the compute dtype
    # Scores are scaled by query_pre_attn_scalar**-0.5 (Gemma); None: head_dim**-0.5.
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the mask
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    attention_sinks: bool = False  # gpt-oss: a learned logit per query head in each softmax denominator
    # Gemma 4 (`layer(i)` gives each layer's own config): full layers' heads have their own width and, where
    # set, their own number of kv heads; with k_eq_v a full layer's values are its keys' projection.
    global_head_dim: int | None = None
    global_kv_heads: int | None = None
    k_eq_v: bool = False
    v_norm: bool = False  # Gemma 4: values RMS-normalised (no weight) before attention
    layer_scale: bool = False  # Gemma 4: each layer's output times a scalar the checkpoint holds (not trained)
    # Gemma 4's per-layer inputs: a second embedding table (per_layer_vocab_size rows of per_layer_input_dim
    # values per layer), mixed with a projection of the embeddings and fed into each layer's output.
    per_layer_input_dim: int | None = None
    per_layer_vocab_size: int | None = None
    # Gemma 4: the last kv_shared_layers layers compute no keys and values; each attends with those of the
    # last earlier layer of its type (`kv_source`). With double_wide_mlp their MLPs are 2 x mlp_dim wide.
    kv_shared_layers: int = 0
    double_wide_mlp: bool = False
    # Gated DeltaNet layers (Qwen3.5, Qwen3-Next; models/gated_deltanet.py): heads of queries/keys and of
    # values (a multiple), their widths, and the short convolution's width. None: no linear-attention layers.
    linear_key_heads: int | None = None
    linear_value_heads: int | None = None
    linear_key_dim: int | None = None
    linear_value_dim: int | None = None
    linear_conv_width: int = 4
    linear_chunk: int = 64  # tokens per chunk of the delta rule (transformers' and FLA's kernels take 64)
    # Qwen3.5, Qwen3-Next: each query head's projection is twice as wide, its second half a gate on the
    # head's attention output (times sigmoid(gate), before the output projection).
    attention_output_gate: bool = False
    tie_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # output projection (Llama's attention_bias)
    mlp_bias: bool = False  # gate/up/down projections (Llama's mlp_bias)
    # Positions the checkpoint is made for. Not used by the math (RoPE has no table); written to
    # config.json on export, where transformers reads it.
    max_position_embeddings: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # choices.REMAT_POLICIES
    scan_layers: bool = False
    attention: str = "auto"  # choices.ATTENTION_IMPLEMENTATIONS
    # When the mesh splits the sequence (its context axis): how attention meets the other devices' keys
    # (choices.CONTEXT_SCHEMES) and how positions are laid out on the devices (choices.CONTEXT_LAYOUTS).
    context_attention: str = DEFAULT_CONTEXT_SCHEME
    context_layout: str = "zigzag"
    # Each token sees only the last `sliding_window` keys (its own included): on every layer when
    # `layer_types` is None (Mistral), else on the layers marked "sliding_attention".
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer: choices.LAYER_TYPES
    # Mixture of experts (models/moe.py): with num_experts > 0 the MLP of every layer not in `dense_layers`
    # is a router over `num_experts` gated MLPs of width `moe_mlp_dim`, `experts_per_token` per token.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_mlp_dim: int | None = None
    norm_topk_prob: bool = False  # the k router weights renormalised to sum to 1 (Qwen3-MoE; Mixtral)
    shared_expert_dim: int | None = None  # Qwen2-MoE: a gated dense expert beside the routed ones
    dense_layers: tuple[int, ...] = ()  # layers with the dense MLP (Qwen's mlp_only_layers, sparse step)
    router_bias: bool = False  # gpt-oss: the router has a bias
    expert_bias: bool = False  # gpt-oss: each expert's gate, up and down projections have biases
    # gpt-oss's clamped SwiGLU: (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    capacity_factor: float | None = None  # None: dropless; else an expert keeps at most its share x factor
    router_aux_loss_coef: float = 0.0  # the load-balancing loss (transformers' formula) in the objective
    router_z_loss_coef: float = 0.0  # mean squared log-sum-exp of router logits in the objective
    lora: LoraConfig | None = None  # LoRA adapters on the projections it targets (None or rank 0: no adapters)
    init_std: float = 0.02

    def __post_init__(self):
        if self.lora is not None and not self.lora.rank:  # the run's `lora` section with rank 0: LoRA is off
            object.__setattr__(self, "lora", None)
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
            _positive_int(self, key)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"DecoderConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}; set head_dim explicitly")
        for key, choices in (("remat", REMAT_POLICIES), ("attention", ATTENTION_IMPLEMENTATIONS),
                             ("activation", ACTIVATIONS), ("context_attention", CONTEXT_SCHEMES),
                             ("context_layout", CONTEXT_LAYOUTS)):
            if getattr(self, key) not in choices:
                raise ValueError(f"DecoderConfig.{key}={getattr(self, key)!r} must be one of {choices}")
        if self.sandwich_norms and self.post_norms:
            raise ValueError("DecoderConfig.sandwich_norms and post_norms exclude each other (Gemma's four norms "
                             "per layer or OLMo's two after)")
        if self.qk_norm_across_heads and not self.qk_norm:
            raise ValueError("DecoderConfig.qk_norm_across_heads needs qk_norm")
        object.__setattr__(self, "nope_layers", tuple(self.nope_layers))
        if any(not 0 <= i < self.num_layers for i in self.nope_layers):
            raise ValueError(f"DecoderConfig.nope_layers={list(self.nope_layers)} must be layer indices "
                             f"below {self.num_layers}")
        if self.rotary_dim == self.head_size:
            object.__setattr__(self, "rotary_dim", None)  # one way to say "all of each head"
        if self.rotary_dim is not None and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_size):
            raise ValueError(f"DecoderConfig.rotary_dim={self.rotary_dim} must be even and in (0, head_dim="
                             f"{self.head_size}]")
        for key in ("sliding_window", "max_position_embeddings", "head_dim"):
            if getattr(self, key) is not None:
                _positive_int(self, key)
        for key in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"DecoderConfig.{key}={value!r} must be a positive number or None")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad or len(self.layer_types) != self.num_layers:
                raise ValueError(f"DecoderConfig.layer_types must list one of {LAYER_TYPES} per layer "
                                 f"({self.num_layers}); got {len(self.layer_types)} entries, unknown {bad}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("DecoderConfig.layer_types has sliding_attention layers but sliding_window is None")
            if self.has_linear_layers and None in (self.linear_key_heads, self.linear_value_heads,
                                                   self.linear_key_dim, self.linear_value_dim):
                raise ValueError("DecoderConfig.layer_types has linear_attention layers: set linear_key_heads, "
                                 "linear_value_heads, linear_key_dim and linear_value_dim")
        if self.num_experts:
            self._check_experts()
        self._check_layerwise()
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", check_scaling(dict(self.rope_scaling)))
        for key in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, key))  # raises a TypeError naming the bad dtype

    def _check_experts(self) -> None:
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"DecoderConfig.experts_per_token={self.experts_per_token} must be in "
                             f"[1, num_experts={self.num_experts}]")
        _positive_int(self, "moe_mlp_dim")
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if any(not 0 <= i < self.num_layers for i in self.dense_layers):
            raise ValueError(f"DecoderConfig.dense_layers={list(self.dense_layers)} must be layer indices "
                             f"below {self.num_layers}")
        if self.scan_layers and 0 < len(set(self.dense_layers)) < self.num_layers:
            raise ValueError(f"scan_layers needs every layer alike, but layers {sorted(self.dense_layers)} are dense "
                             "and the others mixtures of experts; set model.scan_layers=false")
        mlp_targets = [t for t in (self.lora.targets if self.lora else ()) if t in LORA_MLP_TARGETS]
        if mlp_targets and len(self.dense_layers) < self.num_layers:
            raise ValueError(f"lora.targets includes {mlp_targets}, but LoRA on experts is not implemented (an "
                             "adapter per expert would be a second set of experts); target the attention "
                             "projections: lora.targets=[q, k, v, o]")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"DecoderConfig.capacity_factor={self.capacity_factor!r} must be > 0 or None")

    def _check_layerwise(self) -> None:
        _positive_int(self, "linear_chunk")
        for key in ("global_head_dim", "global_kv_heads", "per_layer_input_dim", "per_layer_vocab_size",
                    "linear_key_heads", "linear_value_heads", "linear_key_dim", "linear_value_dim"):
            if getattr(self, key) is not None:
                _positive_int(self, key)
        if self.linear_key_heads and (self.linear_value_heads or 0) % self.linear_key_heads:
            raise ValueError(f"DecoderConfig.linear_value_heads={self.linear_value_heads} must be a multiple of "
                             f"linear_key_heads={self.linear_key_heads}")
        if (self.per_layer_input_dim is None) != (self.per_layer_vocab_size is None):
            raise ValueError("DecoderConfig.per_layer_input_dim and per_layer_vocab_size go together")
        if not 0 <= self.kv_shared_layers < self.num_layers:
            raise ValueError(f"DecoderConfig.kv_shared_layers={self.kv_shared_layers} must be in [0, num_layers)")
        for i in range(self.num_layers - self.kv_shared_layers, self.num_layers):
            if self.kv_source(i) is None:
                raise ValueError(f"DecoderConfig.kv_shared_layers={self.kv_shared_layers}: layer {i} shares the keys "
                                 "and values of an earlier layer of its type, and there is none")
        if self.scan_layers and self.layerwise:
            raise ValueError("scan_layers needs every layer alike, but this model's layers differ in shape (Gemma 4's "
                             "full layers, KV sharing or per-layer inputs; linear-attention layers beside "
                             "full ones); set model.scan_layers=false")

    @property
    def layerwise(self) -> bool:
        """Whether layers differ in their parameters' shapes (Gemma 4), so that one scanned body cannot hold them."""
        return bool(self.global_head_dim or self.global_kv_heads or self.k_eq_v or self.kv_shared_layers
                    or self.per_layer_input_dim or self.layer_scale or self.has_linear_layers)

    @property
    def has_linear_layers(self) -> bool:
        return self.layer_types is not None and "linear_attention" in self.layer_types

    def is_linear(self, i: int) -> bool:
        """Whether layer i is a Gated DeltaNet layer (linear attention) instead of softmax attention."""
        return self.layer_types is not None and self.layer_types[i] == "linear_attention"

    def layer(self, i: int) -> DecoderConfig:
        """Layer i's own config: the full layers' head width and kv heads, the KV-sharing layers' wide MLP."""
        changes = {}
        if not self.is_sliding(i):
            changes = {k: v for k, v in (("head_dim", self.global_head_dim), ("num_kv_heads", self.global_kv_heads))
                       if v is not None}
        if self.double_wide_mlp and self.kv_source(i) is not None:
            changes["mlp_dim"] = 2 * self.mlp_dim
        return dataclasses.replace(self, **changes) if changes else self

    def kv_source(self, i: int) -> int | None:
        """The layer whose keys and values layer i attends with, when it shares them (None: its own)."""
        first = self.num_layers - self.kv_shared_layers
        if i < first:
            return None
        same_kind = [j for j in range(first) if self.is_sliding(j) == self.is_sliding(i)]
        return same_kind[-1] if same_kind else None

    def values_are_keys(self, i: int) -> bool:
        return self.k_eq_v and not self.is_sliding(i)

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    def layer_name(self, layer: int) -> str:
        """The module that holds a layer's parameters: "layers" (every layer stacked on a leading axis, for
        the scan over layers) or "layer_{i}". The decoder, the Hugging Face import/export and PEFT read it."""
        return "layers" if self.scan_layers else f"layer_{layer}"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def window(self, layer: int) -> int | None:
        """The attention window of layer `layer` (None: full causal attention)."""
        return self.sliding_window if self.is_sliding(layer) else None

    def kind(self, layer: int) -> tuple[bool, bool]:
        """(sliding, rotary) of layer `layer`: what makes one layer's attention differ from another's."""
        return self.is_sliding(layer), layer not in self.nope_layers

    def rope_for(self, sliding: bool) -> tuple[float, tuple | None]:
        """(RoPE base, scaling) of a sliding or a full layer."""
        if self.rope_local_theta is not None and sliding:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def uniform_layers(self) -> bool:
        """Whether every layer has the same window and RoPE (`kind`)."""
        return len({self.kind(i) for i in range(self.num_layers)}) == 1

    def projections(self, i: int) -> dict[str, tuple[int, int]]:
        """Layer i's projections as (inputs, outputs): a KV-sharing layer has no k and v, a k_eq_v one no v."""
        c = self.layer(i)
        d, h, f = c.hidden_size, c.head_size, c.mlp_dim
        q, kv = c.num_heads * h, c.num_kv_heads * h
        mlp = {"gate": (d, f), "up": (d, f), "down": (f, d)}
        if self.is_linear(i):  # a Gated DeltaNet layer: no LoRA target among its projections
            return mlp
        out = {"q": (d, 2 * q if self.attention_output_gate else q), "k": (d, kv), "v": (d, kv), "o": (q, d), **mlp}
        if self.kv_source(i) is not None:
            del out["k"], out["v"]
        elif self.values_are_keys(i):
            del out["v"]
        return out

    def num_adapter_params(self) -> int:
        """LoRA's A and B over all layers (0 without LoRA)."""
        if self.lora is None:
            return 0
        return self.lora.rank * sum(sum(shape) for i in range(self.num_layers)
                                    for t, shape in self.projections(i).items() if t in self.lora.targets)

    def num_params(self) -> int:
        """The model's own parameters (the base, without LoRA adapters)."""
        d = self.hidden_size
        total = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        if self.per_layer_input_dim:  # the second table, the projection into it and its norm
            p = self.per_layer_input_dim
            total += (self.per_layer_vocab_size + d) * p * self.num_layers + p
        return total + sum(self._layer_params(i) for i in range(self.num_layers))

    def _linear_params(self) -> int:
        """A Gated DeltaNet layer's token mixer: q, k, v, z, the a/b gates and their per-head constants, the
        convolution over q, k and v, the gated norm and the output projection."""
        d, width = self.hidden_size, self.linear_conv_width
        keys, values = self.linear_key_heads * self.linear_key_dim, self.linear_value_heads * self.linear_value_dim
        hv = self.linear_value_heads
        return (d * (2 * keys + 2 * values + 2 * hv) + (2 * keys + values) * width + 2 * hv
                + self.linear_value_dim + values * d)

    def _layer_params(self, i: int) -> int:
        c = self.layer(i)
        d = c.hidden_size
        total = self._linear_params() if self.is_linear(i) else self._attention_params(i)
        total += (4 if self.sandwich_norms else 2) * d + (1 if self.layer_scale else 0)
        if self.per_layer_input_dim:  # gate, projection and norm of the layer's input
            total += 2 * d * self.per_layer_input_dim + d
        if self.is_moe(i):
            return total + self._moe_params(self.num_experts)
        f = c.mlp_dim
        return total + 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)

    def _attention_params(self, i: int) -> int:
        c, sizes = self.layer(i), self.projections(i)
        d, h, n = c.hidden_size, c.head_size, c.num_heads
        total = sum(a * b for t, (a, b) in sizes.items() if t in ("q", "k", "v", "o"))
        if self.qkv_bias:
            total += sum(sizes[t][1] for t in ("q", "k", "v") if t in sizes)
        if self.qk_norm:
            k_heads = c.num_kv_heads if "k" in sizes else 0
            total += (n + k_heads) * h if self.qk_norm_across_heads else h * (1 + bool(k_heads))
        return total + (d if self.o_bias else 0) + (n if self.attention_sinks else 0)

    def _moe_params(self, experts: int) -> int:
        d, shared, f = self.hidden_size, self.shared_expert_dim or 0, self.moe_mlp_dim
        router = (d + 1 if self.router_bias else d) * self.num_experts
        per_expert = 3 * d * f + ((2 * f + d) if self.expert_bias else 0)
        return router + experts * per_expert + (3 * d * shared + d if shared else 0)

    def num_active_params(self) -> int:
        """Parameters a token passes through: with experts, only `experts_per_token` of them (for FLOPs)."""
        inactive = sum(self._moe_params(self.num_experts) - self._moe_params(self.experts_per_token)
                       for i in range(self.num_layers) if self.is_moe(i))
        return self.num_params() - inactive


def _positive_int(cfg: DecoderConfig, key: str) -> None:
    value = getattr(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"DecoderConfig.{key}={value!r} must be a positive int")
