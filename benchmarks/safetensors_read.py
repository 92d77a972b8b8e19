"""Reading one large tensor as 8 device shards of its transpose (what the sharded import does for a
[out, in] weight): a numpy memory map of its bytes (hf.SafetensorsDir) against the safetensors package's
`get_tensor` once per shard. Prints seconds and the process's peak RSS; run each mode in its own process:
    python benchmarks/safetensors_read.py FILE.safetensors TENSOR_NAME memmap|safetensors
"""

import json
import resource
import sys
import time

import ml_dtypes
import numpy as np
from safetensors import safe_open

path, name, mode = sys.argv[1:4]
t0 = time.perf_counter()
if mode == "memmap":
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(size))[name]
    start, end = meta["data_offsets"]
    whole = np.memmap(path, np.uint8, "r", offset=8 + size + start, shape=(end - start,))
    tensor = whole.view(ml_dtypes.bfloat16).reshape(meta["shape"])
    read = lambda: tensor  # noqa: E731
else:
    handle = safe_open(path, "numpy")
    read = lambda: handle.get_tensor(name)  # noqa: E731
for i in range(8):
    ours = read().T
    width = ours.shape[1] // 8
    shard = np.asarray(ours[:, i * width:(i + 1) * width], np.float32)
print(f"{mode}: {name} {tuple(ours.shape)} as 8 shards in {time.perf_counter() - t0:.2f} s, peak RSS "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
