"""The gated delta rule (Gated DeltaNet, the linear-attention layers of Qwen3.5 and Qwen3-Next): a state
S [key dim, value dim] per head, per token t

    S <- exp(g_t) S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t

with q scaled by key_dim**-0.5 (and q, k L2-normalised first when asked). `chunked` computes it as
transformers' `torch_chunk_gated_delta_rule` does: within a chunk, a unit-lower-triangular solve (the UT
transform) turns the chunk's updates into matmuls, and a scan over chunks carries the state, in float32.
`recurrent` is the token-by-token form (decoding; one token is one step).

Packed rows: the state starts from zero at every segment boundary (`segment_ids` change), so a packed row
equals its segments run separately. Within a chunk that is a mask on the pairwise decays (tokens of
different segments do not see each other) and a flag per token saying whether it still reads the state
carried in from the previous chunk (only the chunk's first segment does, and only if it began before).
Shape letters: B batch, T length, H heads, K key dim, V value dim, C chunk length, N chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum x^2 + eps) over the last axis (transformers' and FLA's l2norm)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def runs(segment_ids_BxT: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Each token's run: a count of segment boundaries up to it, so that tokens share a run exactly when no
    boundary lies between them (a segment id that comes back later is a new run)."""
    if segment_ids_BxT is None:
        return jnp.zeros((batch, length), jnp.int32)
    boundary = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], 1)
    return jnp.cumsum(boundary, axis=1, dtype=jnp.int32)


def _prepare(q, k, v, g, beta, l2norm):
    """float32 [B, H, T, ...] inputs, q and k normalised as asked, q scaled by key_dim**-0.5."""
    q, k, v = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (q, k, v))
    g, beta = (x.astype(jnp.float32).transpose(0, 2, 1) for x in (g, beta))
    if l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def chunked(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, segment_ids_BxT=None, *, chunk: int = 64,
            initial_state_BxHxKxV=None, l2norm: bool = True):
    """(output [B, T, H, V] in v's dtype, final state [B, H, K, V] float32). `g` is the log of each token's
    decay (<= 0), `beta` its update strength; heads of q and k already match v's (grouped heads repeated).
    A length that is not a multiple of `chunk` is padded with tokens that change nothing."""
    batch, length, heads, _ = k_BxTxHxK.shape
    runs_BxT = runs(segment_ids_BxT, batch, length)
    q, k, v, g, beta = _prepare(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, l2norm)
    pad = -length % chunk
    if pad:  # zero keys and beta: no update; their outputs are dropped
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
        g, beta = (jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in (g, beta))
        runs_BxT = jnp.pad(runs_BxT, ((0, 0), (0, pad)), mode="edge")
    n = (length + pad) // chunk

    def split(x):  # [B, H, T, ...] -> [N, B, H, C, ...]: the scan runs over chunks
        return jnp.moveaxis(x.reshape(*x.shape[:2], n, chunk, *x.shape[3:]), 2, 0)

    q_N, k_N, v_N, g_N, beta_N = (split(x) for x in (q, k, v, g, beta))
    runs_NxBx1xC = jnp.moveaxis(runs_BxT.reshape(batch, 1, n, chunk), 2, 0)
    previous_run_NxBx1 = jnp.concatenate([jnp.full((1, batch, 1), -1, jnp.int32), runs_NxBx1xC[:-1, ..., -1]], 0)
    state = (jnp.zeros((batch, heads, k.shape[-1], v.shape[-1]), jnp.float32) if initial_state_BxHxKxV is None
             else initial_state_BxHxKxV.astype(jnp.float32))
    if initial_state_BxHxKxV is not None:  # the given state belongs to the row's first segment
        previous_run_NxBx1 = previous_run_NxBx1.at[0].set(runs_NxBx1xC[0, ..., 0])
    # Each chunk's products are recomputed in the backward pass from the carried state, which is all the scan
    # keeps per chunk (a [H, K, V] float32 state): 2.72 -> 1.63 GiB for 8192 tokens x 32 heads of 128.
    final, out_N = jax.lax.scan(jax.checkpoint(_chunk_step), state,
                                (q_N, k_N, v_N, g_N, beta_N, runs_NxBx1xC, previous_run_NxBx1))
    out_BxHxTxV = jnp.moveaxis(out_N, 0, 2).reshape(batch, heads, n * chunk, -1)[:, :, :length]
    return out_BxHxTxV.transpose(0, 2, 1, 3).astype(v_BxTxHxV.dtype), final


def _chunk_step(state_BxHxKxV, xs):
    """One chunk: its outputs from the carried state and from its own tokens, and the state after it."""
    q, k, v, g, beta, runs_Bx1xC, previous_Bx1 = xs
    size = g.shape[-1]
    same_Bx1xCxC = (runs_Bx1xC[..., :, None] == runs_Bx1xC[..., None, :]) & jnp.tril(jnp.ones((size, size), bool))
    reads_Bx1xC = runs_Bx1xC == previous_Bx1[..., None]  # still in the segment the carried state belongs to
    cum_BxHxC = jnp.cumsum(g, axis=-1)
    # decay from token j to token i of one segment; 0 across segments and from later tokens (no overflow: the
    # exponent is masked before exp)
    decay_BxHxCxC = jnp.exp(jnp.where(same_Bx1xCxC, cum_BxHxC[..., :, None] - cum_BxHxC[..., None, :], -jnp.inf))
    k_beta = k * beta[..., None]
    # The UT transform: (I + strictly lower part of A) X = B, solved for the new values and decayed keys.
    a_BxHxCxC = jnp.einsum("bhik,bhjk->bhij", k_beta, k) * decay_BxHxCxC
    system = jnp.tril(a_BxHxCxC, -1) + jnp.eye(size, dtype=a_BxHxCxC.dtype)
    carried_BxHxC = jnp.where(reads_Bx1xC, jnp.exp(cum_BxHxC), 0.0)

    def solve(b):
        return jax.scipy.linalg.solve_triangular(system, b, lower=True, unit_diagonal=True)

    new_values = solve(v * beta[..., None])
    old_state_keys = solve(k_beta * carried_BxHxC[..., None])
    v_new = new_values - jnp.einsum("bhck,bhkv->bhcv", old_state_keys, state_BxHxKxV)
    intra_BxHxCxC = jnp.einsum("bhik,bhjk->bhij", q, k) * decay_BxHxCxC
    out = (jnp.einsum("bhck,bhkv->bhcv", q * carried_BxHxC[..., None], state_BxHxKxV)
           + jnp.einsum("bhij,bhjv->bhiv", intra_BxHxCxC, v_new))
    # The state after the chunk: the carried one if the chunk's last token still reads it, plus every token of
    # the last segment, decayed to the chunk's end.
    last_same_BxHxC = decay_BxHxCxC[..., -1, :]
    new_state = (state_BxHxKxV * carried_BxHxC[..., -1, None, None]
                 + jnp.einsum("bhck,bhc,bhcv->bhkv", k, last_same_BxHxC, v_new))
    return new_state, out


def recurrent(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, initial_state_BxHxKxV=None, *,
              l2norm: bool = True):
    """The same rule token by token (decoding): (output [B, T, H, V], final state [B, H, K, V] float32)."""
    q, k, v, g, beta = _prepare(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, l2norm)
    batch, heads = q.shape[:2]
    state = (jnp.zeros((batch, heads, k.shape[-1], v.shape[-1]), jnp.float32) if initial_state_BxHxKxV is None
             else initial_state_BxHxKxV.astype(jnp.float32))

    def step(s, xs):
        q_t, k_t, v_t, g_t, beta_t = xs
        s = s * jnp.exp(g_t)[..., None, None]
        delta = (v_t - jnp.einsum("bhkv,bhk->bhv", s, k_t)) * beta_t[..., None]
        s = s + k_t[..., :, None] * delta[..., None, :]
        return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

    final, out_T = jax.lax.scan(step, state, tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, g, beta)))
    return jnp.moveaxis(out_T, 0, 1).astype(v_BxTxHxV.dtype), final
