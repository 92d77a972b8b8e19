"""gpt-oss's MXFP4 expert weights, read without ever holding a whole tensor: `Mxfp4` is a lazy view
[experts, in, out] of a checkpoint's `*_blocks` [experts, out, in / 32, 16] (two 4-bit E2M1 codes per byte,
the low nibble first) and `*_scales` [experts, out, in / 32] (a power-of-two exponent per 32 values, biased
by 127). Indexing composes ranges; `np.asarray` decodes only the indexed experts, rows and 32-value groups,
so each device's shard is dequantized from its own bytes (memory-mapped), as transformers' own
`convert_moe_packed_tensors` would decode them (the values are exact in bfloat16 and float32)."""

from __future__ import annotations

import numpy as np

# The 16 E2M1 values, by code.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
GROUP = 32  # values per scale


class Mxfp4:
    def __init__(self, blocks: np.ndarray, scales: np.ndarray, ranges: tuple[range, range, range] | None = None):
        experts, rows, groups, pairs = blocks.shape
        if scales.shape != (experts, rows, groups) or pairs * 2 != GROUP:
            raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair up "
                             f"(blocks [experts, out, in/{GROUP}, {GROUP // 2}], scales [experts, out, in/{GROUP}])")
        self.blocks, self.scales = blocks, scales
        self.ranges = ranges or (range(experts), range(groups * GROUP), range(rows))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(r) for r in self.ranges)

    def __getitem__(self, key) -> Mxfp4:
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (3 - len(key) + 1) + key[at + 1:]
        key = key + (slice(None),) * (3 - len(key))
        if not all(isinstance(k, slice) for k in key):
            raise TypeError(f"an MXFP4 view takes slices, got {key}")
        return Mxfp4(self.blocks, self.scales, tuple(r[k] for r, k in zip(self.ranges, key)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        experts, inputs, rows = (np.asarray(r, np.int64) for r in self.ranges)
        if not (len(experts) and len(inputs) and len(rows)):
            return np.zeros(self.shape, dtype or np.float32)
        first, last = inputs.min() // GROUP, inputs.max() // GROUP + 1
        groups = np.arange(first, last)
        codes = np.asarray(self.blocks[np.ix_(experts, rows, groups)])  # [e, o, g, 16]
        values = np.empty(codes.shape[:-1] + (GROUP,), np.float32)
        values[..., 0::2] = FP4_VALUES[codes & 0x0F]
        values[..., 1::2] = FP4_VALUES[codes >> 4]
        exponents = np.asarray(self.scales[np.ix_(experts, rows, groups)]).astype(np.int32) - 127
        values = np.ldexp(values, exponents[..., None]).reshape(len(experts), len(rows), -1)
        out = values[:, :, inputs - first * GROUP].transpose(0, 2, 1)  # [e, in, out]
        return out.astype(dtype) if dtype is not None else out
