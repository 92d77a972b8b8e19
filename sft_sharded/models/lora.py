"""LoRA adapters on the decoder's projections: y = W x + scale * B(A x), A random and B zero at init (as
PEFT does), so step 0 is the base model. Adapters are parameters with logical axis names (the rank axis
is "lora_rank", replicated), so they shard like the weights they adapt; `is_adapter` tells the trainer
which parameters train and which form the frozen base.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_sharded.parallel.sharding import key_name

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")


def is_adapter(path: tuple) -> bool:
    """Whether the parameter at this tree path is a LoRA adapter (trained) rather than base (frozen)."""
    return any(key_name(k).endswith(ADAPTER_SUFFIXES) for k in path)


def _kaiming_uniform(fan_in: int):
    """PEFT's init of A (torch's kaiming_uniform_ with a=sqrt(5)): uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def delta(module: nn.Module, target: str, x: jax.Array, spec: str, in_shape: tuple[int, ...],
          in_axes: tuple[str, ...], out_shape: tuple[int, ...], out_axes: tuple[str, ...]) -> jax.Array | None:
    """scale * B(A x) for the projection `target` of `module`, or None when LoRA does not adapt it.

    `spec` is the projection's einsum ("btd,dnh->btnh"); A is [*in_shape, r] and B is [r, *out_shape]."""
    lora = module.config.lora
    if lora is None or target not in lora.targets:
        return None
    dtype, param_dtype = jnp.dtype(module.config.dtype), jnp.dtype(module.config.param_dtype)
    r = lora.rank
    a = module.param(f"{target}_lora_a", nn.with_logical_partitioning(_kaiming_uniform(math.prod(in_shape)),
                     (*in_axes, "lora_rank")), (*in_shape, r), param_dtype).astype(dtype)
    b = module.param(f"{target}_lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                     ("lora_rank", *out_axes)), (r, *out_shape), param_dtype).astype(dtype)
    if lora.dropout and module.has_rng("dropout"):  # training: the trainer passes a dropout rng
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0.0).astype(x.dtype)
    x_spec, w_spec = spec.split("->")[0].split(",")
    y_spec = spec.split("->")[1]
    in_letters = w_spec[: len(in_shape)]
    out_letters = w_spec[len(in_shape):]
    low = jnp.einsum(f"{x_spec},{in_letters}r->{x_spec.replace(in_letters, '')}r", x, a)
    up = jnp.einsum(f"{x_spec.replace(in_letters, '')}r,r{out_letters}->{y_spec}", low, b)
    return (lora.scale * up).astype(dtype)
