"""Independent numpy (float64) references: a Llama forward pass and masked cross entropy."""

import numpy as np
from flax import linen as nn


# Gradients: rtol 1e-5 elementwise, plus atol 1e-6 (about 1e-5 of the largest gradient, ~0.1) for elements
# that are sums of cancelling terms, where a different float32 summation order moves the last bits.
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


def to_numpy(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(x.value if isinstance(x, nn.Partitioned) else x, np.float64), tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _rms(x, scale, eps):
    return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x, positions, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = positions[..., None] * inv
    cos = np.cos(np.concatenate([ang, ang], -1))[:, :, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, :, None]
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def llama_logits(params, cfg, ids, positions=None, segment_ids=None):
    p = to_numpy(params)
    b, t = ids.shape
    positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else np.asarray(positions)
    group = cfg.num_heads // cfg.num_kv_heads
    mask = np.tril(np.ones((t, t), bool))[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    x = p["embedding"][ids]
    for i in range(cfg.num_layers):
        lp = p[f"layer_{i}"]
        h = _rms(x, lp["attn_norm"]["scale"], cfg.rms_norm_eps)
        proj = {}
        for name in ("wq", "wk", "wv"):
            proj[name] = np.einsum("btd,dnh->btnh", h, lp["attn"][name])
            if cfg.qkv_bias:
                proj[name] = proj[name] + lp["attn"][name + "_bias"]
        q = _rope(proj["wq"], positions, cfg.rope_theta)
        k = np.repeat(_rope(proj["wk"], positions, cfg.rope_theta), group, axis=2)  # query head n -> kv head n // group
        v = np.repeat(proj["wv"], group, axis=2)
        scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(mask[:, None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("bnts,bsnh,nhd->btd", probs, v, lp["attn"]["wo"])
        h = _rms(x, lp["mlp_norm"]["scale"], cfg.rms_norm_eps)
        gate = h @ lp["mlp"]["w_gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ lp["mlp"]["w_up"])) @ lp["mlp"]["w_down"]
    x = _rms(x, p["final_norm"]["scale"], cfg.rms_norm_eps)
    head = p["embedding"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ head


def masked_ce(logits, labels, mask):
    """Mean over masked-in targets of -log softmax(logits)[label], in float64."""
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    per_token = logz - picked
    return float(np.sum(np.where(mask, per_token, 0.0)) / max(mask.sum(), 1)), per_token


def random_batch(seed: int, rows: int = 8, length: int = 16, vocab: int = 64) -> dict[str, np.ndarray]:
    """Random tokens, next-token labels, and 0-label padding at the end of some rows."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (rows, length)).astype(np.int32)
    labels = np.roll(ids, -1, axis=1)
    lengths = rng.integers(length // 2, length + 1, rows)
    for r, n in enumerate(lengths):
        labels[r, n - 1 :] = 0
    return {"input_ids": ids, "labels": labels}
