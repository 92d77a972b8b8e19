"""The decoder of every family we import (`DecoderConfig` says how a family differs): the layer stack,
the embedding and the output head. Layers are in `layers.py`, RoPE in `rope.py`, attention kernels in
`attention.py`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.attention.layout import layout_order, zigzag_to_natural
from sft_sharded.models.attention.masking import apply_softcap
from sft_sharded.models.gated_deltanet import GatedDeltaNet, init_state
from sft_sharded.models.layers import MLP, Attention, PerLayerInput, RMSNorm, param, weight
from sft_sharded.models.moe import MoE
from sft_sharded.parallel.sharding import constrain, logical_shards, sequence_shards

RESIDUAL = ("batch", "length", "act_embed")


class DecoderLayer(nn.Module):
    config: DecoderConfig  # this layer's (`DecoderConfig.layer`)
    moe: bool = False  # a mixture of experts in place of the dense MLP
    values_are_keys: bool = False  # Gemma 4's k_eq_v full layers
    linear: bool = False  # a Gated DeltaNet layer (linear attention) in place of softmax attention

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, decode=None, cache=None, kind=None, shared_kv=None,
                 per_layer_BxTxP=None):
        """Returns (x, this layer's keys and values: its updated KV cache, or what a later layer shares, or
        None); the pair is also nn.scan's (carry, ys). `kind` is the layer's (sliding, rotary)
        (`DecoderConfig.kind`): Python bools, or traced in a scanned stack of mixed layers; None when all
        layers are alike. `shared_kv` and `per_layer_BxTxP` are Gemma 4's (the keys and values of the layer
        this one shares them with; this layer's per-layer input)."""
        cfg = self.config
        sliding, rotary = cfg.kind(0) if kind is None else kind
        pre_norms = not cfg.post_norms  # OLMo normalises each block's output only

        def norm(name, x):
            return RMSNorm(cfg, name=name)(x)

        mixer_in_BxTxD = norm("attn_norm", x_BxTxD) if pre_norms else x_BxTxD
        if self.linear:  # its "kv" is its decoding state
            attn_BxTxD, kv = GatedDeltaNet(cfg, name="linear_attn")(mixer_in_BxTxD, segment_ids_BxT,
                                                                    None if decode is None else cache)
        else:
            attn_BxTxD, kv = Attention(cfg, self.values_are_keys, name="attn")(
                mixer_in_BxTxD, positions_BxT, segment_ids_BxT, sliding, rotary, decode, cache, shared_kv)
        if cfg.sandwich_norms or cfg.post_norms:
            attn_BxTxD = norm("post_attn_norm", attn_BxTxD)
        x_BxTxD = x_BxTxD + attn_BxTxD
        h_BxTxD = norm("mlp_norm", x_BxTxD) if pre_norms else x_BxTxD
        if self.moe:
            real_BxT = jnp.ones(h_BxTxD.shape[:2], bool) if segment_ids_BxT is None else segment_ids_BxT != 0
            mlp_BxTxD = MoE(cfg, name="moe")(h_BxTxD, real_BxT)
        else:
            mlp_BxTxD = MLP(cfg, name="mlp")(h_BxTxD)
        if cfg.sandwich_norms or cfg.post_norms:
            mlp_BxTxD = norm("post_mlp_norm", mlp_BxTxD)
        x_BxTxD = x_BxTxD + mlp_BxTxD
        if cfg.per_layer_input_dim:
            x_BxTxD = x_BxTxD + PerLayerInput(cfg, name="per_layer_input")(x_BxTxD, per_layer_BxTxP)
        if cfg.layer_scale:  # a buffer in transformers: no gradient (and, named a scale, no weight decay)
            scale = param(self, "layer_scale", (1,), ("norm",), nn.initializers.ones)
            x_BxTxD = x_BxTxD * jax.lax.stop_gradient(scale).astype(x_BxTxD.dtype)
        return constrain(x_BxTxD, RESIDUAL), kv


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Decoder(nn.Module):
    """The decoder. Entry points (`apply(variables, ..., method=...)`):

    - `__call__(input_ids_BxT, positions=None, segment_ids=None) -> logits_BxTxV` (float32);
    - `hidden_and_head(...) -> (hidden_BxTxD, head_DxV)`: the final hidden states and the output head, for
      a loss that projects chunk by chunk (`losses.chunked_cross_entropy`, which applies
      `config.final_softcap` as `logits` does);
    - `decode(input_ids_BxT, positions, segment_ids, cache) -> (logits_BxTxV, cache)`: writes the tokens
      at `cache["index"]` of a KV cache from `init_cache`.

    Shape letters, here and in every module of the model: B batch, T length (S: the KV cache's length),
    D model width (`hidden_size`), N query heads, K kv heads, H head dim, F MLP width, V vocabulary.
    """

    config: DecoderConfig

    def __call__(self, input_ids_BxT, positions=None, segment_ids=None):
        x_BxTxD, head_DxV, _ = self._forward(input_ids_BxT, positions, segment_ids, None)
        return logits(x_BxTxD, head_DxV, self.config.final_softcap)

    def hidden_and_head(self, input_ids_BxT, positions=None, segment_ids=None):
        x_BxTxD, head_DxV, _ = self._forward(input_ids_BxT, positions, segment_ids, None)
        return x_BxTxD, head_DxV

    def decode(self, input_ids_BxT, positions, segment_ids, cache):
        x_BxTxD, head_DxV, new_cache = self._forward(input_ids_BxT, positions, segment_ids, cache)
        return logits(x_BxTxD, head_DxV, self.config.final_softcap), new_cache

    def _embed(self, input_ids_BxT):
        cfg = self.config
        embedding_VxD = weight(self, "embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                               nn.initializers.normal(cfg.init_std), keep_narrow=True)
        # Look up all of the fsdp group's tokens in this device's slice of the hidden dim (the table stays
        # sharded as stored), then reshard to batch-split activations: ids and [B, T, D] rows move, never
        # the [V, D] table, and the table's gradient lands in its own shard with no reduction over fsdp.
        ids_BxT = constrain(input_ids_BxT, ("replica_batch", None))
        # A table stored narrower than the compute dtype is widened row by row, never whole.
        rows_BxTxD = jnp.take(embedding_VxD, ids_BxT, axis=0).astype(cfg.dtype)
        rows_BxTxD = constrain(rows_BxTxD, ("replica_batch", None, "embed"))
        if cfg.embed_scale:  # Gemma: sqrt(hidden) rounded to the compute dtype first, as transformers does
            rows_BxTxD = rows_BxTxD * jnp.asarray(cfg.hidden_size ** 0.5, cfg.dtype)
        rows_BxTxD = constrain(rows_BxTxD, ("replica_batch", "length", "lookup_embed"))
        return constrain(rows_BxTxD, RESIDUAL), embedding_VxD

    def _per_layer_inputs(self, input_ids_BxT, x_BxTxD):
        """Gemma 4's per-layer inputs [B, T, layers, P]: each token's rows of the second table (scaled by
        sqrt(P)) averaged with a normalised projection of its embedding, as transformers mixes them."""
        cfg = self.config
        layers, p, d = cfg.num_layers, cfg.per_layer_input_dim, cfg.hidden_size
        init = nn.initializers.normal(cfg.init_std)
        # sharded as the main table is (its columns over fsdp): at 262k rows x 35 layers x 256 it is half the model
        table = weight(self, "per_layer_embedding", (cfg.per_layer_vocab_size, layers * p), ("vocab", "embed"), init)
        rows_BxTxLP = jnp.take(table, input_ids_BxT, axis=0) * jnp.asarray(p ** 0.5, cfg.dtype)
        projection_DxLP = weight(self, "per_layer_projection", (d, layers * p), ("embed", None), init)
        mixed_BxTxLP = jnp.einsum("btd,dp->btp", x_BxTxD, projection_DxLP) * d ** -0.5
        shape = (*input_ids_BxT.shape, layers, p)
        mixed_BxTxLxP = RMSNorm(cfg, name="per_layer_norm")(mixed_BxTxLP.reshape(shape))
        return (mixed_BxTxLxP + rows_BxTxLP.reshape(shape)) * 2 ** -0.5

    def _layers(self, x_BxTxD, positions, segment_ids, decode, cache, per_layer_BxTxLxP):
        cfg = self.config
        layer_cls = DecoderLayer
        if cfg.remat != "none":
            # An unrolled layer's `kind` is Python bools: static, so its window stays a compile-time fact.
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                                 static_argnums=() if cfg.scan_layers else (6,))
        if not cfg.scan_layers:
            kv_L = []  # each layer's keys and values (a KV-sharing layer's are its source's, and not its cache)
            for i in range(cfg.num_layers):
                source = cfg.kv_source(i)
                x_BxTxD, kv = layer_cls(cfg.layer(i), moe=cfg.is_moe(i), values_are_keys=cfg.values_are_keys(i),
                                        linear=cfg.is_linear(i), name=cfg.layer_name(i))(
                    x_BxTxD, positions, segment_ids, decode, None if cache is None else cache["layers"][i],
                    cfg.kind(i), None if source is None else kv_L[source],
                    None if per_layer_BxTxLxP is None else per_layer_BxTxLxP[:, :, i])
                kv_L.append(kv)
            return x_BxTxD, [None if cfg.kv_source(i) is not None else kv for i, kv in enumerate(kv_L)]
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "moe": 0},  # "moe": router statistics sown per layer
            split_rngs={"params": True, "dropout": True},  # a fresh LoRA dropout mask per layer
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        kind_L = None
        if not cfg.uniform_layers:
            kind_L = tuple(jnp.array(flags) for flags in zip(*(cfg.kind(i) for i in range(cfg.num_layers))))
        layer_caches = None if cache is None else cache["layers"]
        stacked = stack(cfg, moe=cfg.is_moe(0), name=cfg.layer_name(0))  # scanned: one name for every layer
        return stacked(x_BxTxD, positions, segment_ids, decode, layer_caches, kind_L)

    @nn.compact
    def _forward(self, input_ids_BxT, positions, segment_ids, cache):
        """(final hidden states, output head, updated cache or None)."""
        cfg = self.config
        batch, length = input_ids_BxT.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        # A sequence split over the mesh runs in the layout its attention balances (models/attention/split.py);
        # everything else is position by position, so only the inputs and the final states move.
        order = None if cache is not None else layout_order(length, sequence_shards(length), cfg.context_layout)
        if order is not None:
            input_ids_BxT, positions, segment_ids = (None if a is None else a[:, order]
                                                     for a in (input_ids_BxT, positions, segment_ids))
        x_BxTxD, embedding_VxD = self._embed(input_ids_BxT)
        per_layer_BxTxLxP = self._per_layer_inputs(input_ids_BxT, x_BxTxD) if cfg.per_layer_input_dim else None
        decode = None
        if cache is not None:
            if segment_ids is None:
                segment_ids = jnp.ones((batch, length), jnp.int32)
            kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, cache["index"]))
            decode = (kv_segments, cache["index"])
        x_BxTxD, new_layers = self._layers(x_BxTxD, positions, segment_ids, decode, cache, per_layer_BxTxLxP)
        x_BxTxD = RMSNorm(cfg, name="final_norm")(x_BxTxD)
        if order is not None:
            x_BxTxD = zigzag_to_natural(x_BxTxD, RESIDUAL)
        if cfg.tie_embeddings:
            head_DxV = embedding_VxD.T
        else:
            head_DxV = weight(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                              nn.initializers.normal(cfg.init_std), keep_narrow=True)
        new_cache = None
        if cache is not None:
            new_cache = {"layers": new_layers, "segment_ids": decode[0], "index": cache["index"] + length}
        return x_BxTxD, head_DxV, new_cache


def softcap(logits_BxTxV: jax.Array, cap: float | None) -> jax.Array:
    """The final logits' soft-cap: the attention scores' one (`masking.apply_softcap`), without its derivative."""
    return apply_softcap(logits_BxTxV, cap)[0]


# The most bytes of a widened head at once. XLA:CPU widens a dot's narrower operand into a buffer of its own
# (TPU and GPU fuse the cast into the dot): a 128,256 x 2,048 bfloat16 head under float32 compute is 1 GiB.
HEAD_BLOCK_BYTES = 128 * 2**20


def _vocab_blocks(vocab: int, wanted: int) -> int:
    """The fewest blocks, at least `wanted`, that split the vocabulary evenly (1 when none up to 4x does)."""
    return next((n for n in range(wanted, 4 * wanted + 1) if vocab % n == 0), 1)


def head_product(x_NxD: jax.Array, head_DxV: jax.Array, dtype) -> jax.Array:
    """x [..., D] times the output head, accumulated in `dtype`. A head stored narrower than x (`weight`'s
    keep_narrow) is widened one vocabulary block of about HEAD_BLOCK_BYTES at a time, in a loop, and each
    widened block is recomputed in the backward pass rather than kept; a head split over the mesh's
    vocabulary axis is widened whole, as each device holds only its part."""
    dim, vocab = head_DxV.shape
    blocks = 1
    if head_DxV.dtype != x_NxD.dtype and logical_shards("vocab", vocab) == 1:
        blocks = _vocab_blocks(vocab, -(-dim * vocab * x_NxD.dtype.itemsize // HEAD_BLOCK_BYTES))
    if blocks == 1:
        return jnp.einsum("...d,dv->...v", x_NxD, head_DxV.astype(x_NxD.dtype), preferred_element_type=dtype)

    @jax.checkpoint
    def block(head_UxD):  # one block of the vocabulary, rows of the [V, D] table (a tied head's own layout)
        return jnp.einsum("...d,ud->...u", x_NxD, head_UxD.astype(x_NxD.dtype), preferred_element_type=dtype)

    out_KxNxU = jax.lax.map(block, head_DxV.T.reshape(blocks, vocab // blocks, dim))
    return jnp.moveaxis(out_KxNxU, 0, -2).reshape(*x_NxD.shape[:-1], vocab)


def logits(x_BxTxD: jax.Array, head_DxV: jax.Array, cap: float | None = None, dtype=jnp.float32) -> jax.Array:
    """Logits in `dtype` (float32; the training loss asks for the activations' dtype), soft-capped when
    the config caps them (Gemma 2)."""
    logits_BxTxV = head_product(x_BxTxD, head_DxV, dtype)
    return constrain(softcap(logits_BxTxV, cap), ("batch", "length", "act_vocab"))


def init_cache(cfg: DecoderConfig, batch: int, max_length: int) -> dict:
    """An empty KV cache for `max_length` positions: zeros, segment 0 (nothing visible), index 0. Each layer's
    is (keys, values); a layer that shares another's (Gemma 4) has none, a linear-attention layer has its
    recurrent state instead (`gated_deltanet.init_state`)."""
    def zeros(c: DecoderConfig, *layers: int):
        shape = (*layers, batch, max_length, c.num_kv_heads, c.head_size)
        return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)

    if cfg.scan_layers:
        layers = zeros(cfg, cfg.num_layers)
    else:
        layers = [init_state(cfg, batch) if cfg.is_linear(i) else None if cfg.kv_source(i) is not None
                  else zeros(cfg.layer(i)) for i in range(cfg.num_layers)]
    return {"layers": layers, "segment_ids": jnp.zeros((batch, max_length), jnp.int32), "index": jnp.int32(0)}
