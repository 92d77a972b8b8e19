"""Mixture-of-experts MLP: a softmax router picks `experts_per_token` experts per token, each a gated MLP,
and the token's output is their outputs weighted by the router (Qwen3-MoE, Qwen2-MoE with its shared
expert, Mixtral).

Dropless: the (token, expert) pairs are sorted by expert and each expert multiplies its own contiguous
group with one grouped matmul (`jax.lax.ragged_dot`, on CPU, GPU and TPU), so no token is dropped and no
expert computes a token it was not given. With `capacity_factor` an expert keeps at most
ceil(factor * tokens * k / experts) of its pairs (the earliest tokens first) and the rest are dropped
(their weight is lost, as in fixed-shape MoE training); dropped pairs are counted.

Router statistics for the load-balancing loss are sown per layer into the "moe" collection as `RouterSums`:
per expert, the number of (real token, slot) picks and the sum of router probabilities over real tokens,
and the number of real tokens, so the loss can be formed over the global batch.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sft_sharded.models.config import DecoderConfig
from sft_sharded.models.layers import MLP, gated, param, weight
from sft_sharded.parallel.sharding import activation_spec, constrain


@flax.struct.dataclass
class RouterSums:
    """Router statistics of one layer's tokens, or (from `router_sums`) of every sparse layer: sums over
    real tokens, so micro-batches and layers add up and the losses are formed over the whole batch."""

    picks: jax.Array  # [E]: (real token, slot) pairs routed to each expert
    probs: jax.Array  # [E]: the router's probabilities summed over real tokens
    tokens: jax.Array  # real tokens
    z: jax.Array  # squared log-sum-exp of the router logits, summed over real tokens
    dropped: jax.Array | None = None  # pairs over an expert's capacity (with `capacity_factor` only)


def route(logits_NxE: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(probs [N, E] float32, top-k weights [N, k], top-k expert ids [N, k]). Ties go to the lower expert
    id (as torch.topk does). `normalize`: the k weights sum to 1 (Qwen3-MoE's norm_topk_prob; Mixtral's
    softmax over the top-k logits is the same thing)."""
    probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
    weights_NxK, experts_NxK = jax.lax.top_k(probs_NxE, k)
    if normalize:
        weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
    return probs_NxE, weights_NxK, experts_NxK


def capacity(num_tokens: int, k: int, num_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * num_tokens * k / num_experts))


def keep_within_capacity(experts_NxK: jax.Array, num_experts: int, cap: int) -> jax.Array:
    """Bool [N, k]: the pairs an expert with room for `cap` keeps, in token order (slot order within a token)."""
    one_hot_PxE = jax.nn.one_hot(experts_NxK.reshape(-1), num_experts, dtype=jnp.int32)
    rank_P = jnp.sum((jnp.cumsum(one_hot_PxE, axis=0) - 1) * one_hot_PxE, axis=-1)
    return (rank_P < cap).reshape(experts_NxK.shape)


def _ragged_mlp(x_RxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, glu, biases=None, experts_R=None):
    """Rows sorted by expert, each group through its expert's gated MLP (one ragged matmul per weight;
    `glu(gate, up)` joins the two halves). With `biases` (gate [E, F], up [E, F], down [E, D]; gpt-oss) each
    row adds its expert's (`experts_R`: the expert of each row, past the last for none). Rows past the
    groups (dropped pairs, empty buffer rows) come out zero."""
    def bias(b):
        return 0 if biases is None else jnp.take(b, experts_R, axis=0, mode="fill", fill_value=0).astype(x_RxD.dtype)

    b_gate, b_up, b_down = biases if biases is not None else (None, None, None)
    gate_RxF = jax.lax.ragged_dot(x_RxD, w_gate_ExDxF, group_sizes_E) + bias(b_gate)
    up_RxF = jax.lax.ragged_dot(x_RxD, w_up_ExDxF, group_sizes_E) + bias(b_up)
    y_RxD = jax.lax.ragged_dot(glu(gate_RxF, up_RxF), w_down_ExFxD, group_sizes_E) + bias(b_down)
    # ragged_dot leaves rows past the groups undefined: zero them explicitly.
    return jnp.where((jnp.arange(y_RxD.shape[0]) < jnp.sum(group_sizes_E))[:, None], y_RxD, 0)


def grouped_mlp(x_NxD, experts_NxK, weights_NxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, glu, keep_NxK=None,
                biases=None):
    """sum_k weight[n, k] * expert_{e[n, k]}(x[n]) with one ragged matmul per weight: pairs sorted by expert."""
    num_tokens, k = experts_NxK.shape
    num_experts = w_gate_ExDxF.shape[0]
    flat_P = experts_NxK.reshape(-1)
    if keep_NxK is not None:  # a dropped pair goes to a virtual expert past the last, which computes nothing
        flat_P = jnp.where(keep_NxK.reshape(-1), flat_P, num_experts)
    order_P = jnp.argsort(flat_P, stable=True)
    group_sizes_E = jnp.bincount(flat_P, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    y_PxD = _ragged_mlp(jnp.take(x_NxD, order_P // k, axis=0), group_sizes_E, w_gate_ExDxF, w_up_ExDxF,
                        w_down_ExFxD, glu, biases, flat_P[order_P])
    y_NxKxD = jnp.zeros_like(y_PxD).at[order_P].set(y_PxD).reshape(num_tokens, k, -1)
    return jnp.einsum("nkd,nk->nd", y_NxKxD, weights_NxK.astype(y_NxKxD.dtype))


def _exchange(x_NxD, experts_NxK, weights_NxK, w_gate, w_up, w_down, glu, keep_NxK, biases, axis: str,
              groups: int):
    """Expert parallelism on one device of `groups` along `axis`: each (token, expert) pair goes to the
    group that holds its expert (all-to-all), is multiplied there with one ragged matmul per weight, and
    comes back the same way. The buffers are sized for the worst case (every pair to one group), which
    fixed-shape all-to-all needs; `jax.lax.ragged_all_to_all` would send only the pairs (GPU/TPU)."""
    num_tokens, k = experts_NxK.shape
    local_experts = w_gate.shape[0]
    num_experts = local_experts * groups
    flat_P = experts_NxK.reshape(-1)
    if keep_NxK is not None:
        flat_P = jnp.where(keep_NxK.reshape(-1), flat_P, num_experts)
    pairs = flat_P.shape[0]
    order_P = jnp.argsort(flat_P, stable=True)
    sorted_P = flat_P[order_P]
    counts_E = jnp.bincount(flat_P, length=num_experts + 1)[:num_experts]
    to_group_G = counts_E.reshape(groups, local_experts).sum(1)
    group_P = sorted_P // local_experts  # `groups` for a dropped pair: sent nowhere
    slot_P = jnp.arange(pairs) - (jnp.cumsum(to_group_G) - to_group_G).at[group_P].get(mode="fill", fill_value=0)
    send_GxPxD = jnp.zeros((groups, pairs, x_NxD.shape[1]), x_NxD.dtype).at[group_P, slot_P].set(
        jnp.take(x_NxD, order_P // k, axis=0), mode="drop")
    recv_GxPxD = jax.lax.all_to_all(send_GxPxD, axis, 0, 0, tiled=True)
    recv_counts_GxL = jax.lax.all_to_all(counts_E.reshape(groups, local_experts), axis, 0, 0, tiled=True)
    # Rows from each source come in expert order: their local expert ids from the counts.
    ends_GxL = jnp.cumsum(recv_counts_GxL, axis=1)
    local_GxP = jax.vmap(lambda ends: jnp.searchsorted(ends, jnp.arange(pairs), side="right"))(ends_GxL)
    flat_R = local_GxP.reshape(-1)  # local_experts marks an empty row
    order_R = jnp.argsort(flat_R, stable=True)
    sizes_L = jnp.bincount(flat_R, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    y_RxD = _ragged_mlp(recv_GxPxD.reshape(groups * pairs, -1)[order_R], sizes_L, w_gate, w_up, w_down, glu,
                        biases, flat_R[order_R])
    back_GxPxD = jax.lax.all_to_all(jnp.zeros_like(y_RxD).at[order_R].set(y_RxD).reshape(recv_GxPxD.shape),
                                    axis, 0, 0, tiled=True)
    y_sorted_PxD = back_GxPxD.at[group_P, slot_P].get(mode="fill", fill_value=0)
    y_NxKxD = jnp.zeros_like(y_sorted_PxD).at[order_P].set(y_sorted_PxD).reshape(num_tokens, k, -1)
    return jnp.einsum("nkd,nk->nd", y_NxKxD, weights_NxK.astype(y_NxKxD.dtype))


def dispatch(x_BxTxD, experts_BxTxK, weights_BxTxK, w_gate, w_up, w_down, glu, keep_BxTxK=None, biases=None):
    """The experts' outputs for each device's own rows, in `shard_map` under a mesh: every device sorts
    only its tokens by expert. Without expert parallelism it multiplies them with all experts' weights,
    gathered like a dense layer's under FSDP; with it (the mesh's `expert` axis), each group holds its
    share of the experts and the pairs travel (`_exchange`). Left to XLA, the sort over the batch-sharded
    pairs gathered every token to every device (7x the dense model's step on 8 simulated devices)."""
    row_spec = activation_spec(x_BxTxD.shape, ("batch", "length", None))
    expert_spec = activation_spec(w_gate.shape, ("exp", None, None))
    groups = 1 if expert_spec is None or expert_spec[0] is None else jax.sharding.get_abstract_mesh().shape[
        expert_spec[0]]

    def local(x, experts, weights, w_gate, w_up, w_down, keep, biases):
        n = x.shape[0] * x.shape[1]
        flat = lambda a: None if a is None else a.reshape(n, -1)  # noqa: E731
        args = (flat(x), flat(experts), flat(weights), w_gate, w_up, w_down, glu, flat(keep), biases)
        out = _exchange(*args, expert_spec[0], groups) if groups > 1 else grouped_mlp(*args)
        return out.reshape(x.shape)

    args = (x_BxTxD, experts_BxTxK, weights_BxTxK, w_gate, w_up, w_down, keep_BxTxK, biases)
    if row_spec is None:  # no mesh: one device
        return local(*args)
    rows = P(row_spec[0], row_spec[1], None)
    weights = P(expert_spec[0] if groups > 1 else None, None, None)
    bias_specs = None if biases is None else (P(weights[0], None),) * 3
    specs = (rows, rows, rows, weights, weights, weights, None if keep_BxTxK is None else rows, bias_specs)
    return jax.shard_map(local, in_specs=specs, out_specs=rows, check_vma=False)(*args)


class MoE(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x_BxTxD, real_BxT):
        cfg = self.config
        batch, length, d = x_BxTxD.shape
        e, f, k = cfg.num_experts, cfg.moe_mlp_dim, cfg.experts_per_token
        init = nn.initializers.normal(cfg.init_std)
        x_NxD = x_BxTxD.reshape(batch * length, d)
        router_DxE = param(self, "router", (d, e), ("embed", None), init).astype(cfg.dtype)
        logits_NxE = jnp.einsum("nd,de->ne", x_NxD, router_DxE, preferred_element_type=jnp.float32)
        if cfg.router_bias:  # gpt-oss
            logits_NxE = logits_NxE + param(self, "router_bias", (e,), (None,), nn.initializers.zeros).astype(
                cfg.dtype).astype(jnp.float32)
        probs_NxE, weights_NxK, experts_NxK = route(logits_NxE, k, cfg.norm_topk_prob)
        keep_NxK = None
        if cfg.capacity_factor is not None:
            keep_NxK = keep_within_capacity(experts_NxK, e, capacity(batch * length, k, e, cfg.capacity_factor))
        rows = lambda a: None if a is None else a.reshape(batch, length, k)  # noqa: E731
        out_BxTxD = dispatch(
            x_BxTxD, rows(experts_NxK), rows(weights_NxK),
            weight(self, "w_gate", (e, d, f), ("exp", "embed", "mlp"), init),
            weight(self, "w_up", (e, d, f), ("exp", "embed", "mlp"), init),
            weight(self, "w_down", (e, f, d), ("exp", "mlp", "embed"), init),
            gated(cfg), rows(keep_NxK), self._biases(e, f, d))
        if cfg.shared_expert_dim:  # Qwen2-MoE: a dense expert every token uses, behind a sigmoid gate
            shared = MLP(cfg, mlp_dim=cfg.shared_expert_dim, name="shared_expert")(x_BxTxD)
            gate_D1 = param(self, "shared_gate", (d, 1), ("embed", None), init).astype(cfg.dtype)
            out_BxTxD = out_BxTxD + jax.nn.sigmoid(jnp.einsum("btd,do->bto", x_BxTxD, gate_D1)) * shared
        real_N = real_BxT.reshape(-1).astype(jnp.float32)
        picks_NxE = jnp.sum(jax.nn.one_hot(experts_NxK, e, dtype=jnp.float32), axis=1)
        lse_N = jax.nn.logsumexp(logits_NxE, axis=-1)
        dropped = None if keep_NxK is None else jnp.sum((~keep_NxK).astype(jnp.float32) * real_N[:, None])
        self.sow("moe", "stats", RouterSums(
            picks=jnp.einsum("ne,n->e", picks_NxE, real_N), probs=jnp.einsum("ne,n->e", probs_NxE, real_N),
            tokens=jnp.sum(real_N), z=jnp.sum(lse_N * lse_N * real_N), dropped=dropped))
        return constrain(out_BxTxD, ("batch", "length", "act_embed"))


    def _biases(self, e: int, f: int, d: int):
        """gpt-oss's per-expert biases of the gate, up and down projections (None without them)."""
        if not self.config.expert_bias:
            return None
        zeros = nn.initializers.zeros
        return (weight(self, "w_gate_bias", (e, f), ("exp", "mlp"), zeros),
                weight(self, "w_up_bias", (e, f), ("exp", "mlp"), zeros),
                weight(self, "w_down_bias", (e, d), ("exp", "embed"), zeros))


def router_sums(collection) -> RouterSums:
    """The sown `RouterSums` of every sparse layer (scanned: stacked on a leading axis) added up."""
    def total(x, keep: int):
        return None if x is None else jnp.sum(x, axis=tuple(range(x.ndim - keep)))

    layers = jax.tree.leaves(collection, is_leaf=lambda x: isinstance(x, RouterSums))
    sums = [RouterSums(total(s.picks, 1), total(s.probs, 1), total(s.tokens, 0), total(s.z, 0), total(s.dropped, 0))
            for s in layers]
    return functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), sums)


def router_penalties(part: RouterSums, whole: RouterSums, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """This part's share of the whole batch's load-balancing and z losses: with the whole batch's picks
    and token count (no gradient flows through either), the parts' shares add up to the whole's losses."""
    tokens = jnp.maximum(whole.tokens, 1.0)
    aux = num_experts * jnp.sum(whole.picks * part.probs) / (tokens * tokens)
    return aux, part.z / tokens


def router_metrics(sums: RouterSums, num_experts: int) -> dict[str, jax.Array]:
    """The load-balancing loss as transformers forms it over all sparse layers' real tokens together
    (num_experts * sum_e picks_e / n * probs_e / n), the router z-loss (mean squared log-sum-exp), each
    expert's share of the picks (min and max) and the dropped pairs."""
    tokens = jnp.maximum(sums.tokens, 1.0)
    share = sums.picks / jnp.maximum(jnp.sum(sums.picks), 1.0)
    out = {"moe_aux_loss": num_experts * jnp.sum(sums.picks * sums.probs) / (tokens * tokens),
           "moe_z_loss": sums.z / tokens, "moe_load_min": jnp.min(share), "moe_load_max": jnp.max(share)}
    if sums.dropped is not None:
        out["moe_dropped"] = sums.dropped
    return out
