#!/usr/bin/env bash
# A real-size model on a CPU: a random Llama-3.2-1B-shaped checkpoint (1.24B params, 2.47 GB of bf16
# safetensors, written by our own export), then LoRA r8 (a) on the default 8 simulated devices, where the
# memory check must refuse before the first step, and (b) on one device, whose peak RSS is reported.
#   bash benchmarks/real_size_cpu.sh [WORK_DIR]      (about 8 minutes on 2 cores; needs ~15 GB of RAM)
# SFT_BIN and PYTHON choose the interpreter (e.g. a Python 3.12 / jax 0.12 environment).
set -euo pipefail
work=${1:-/tmp/sft-sharded-real-size}
bin=${SFT_BIN:-.venv/bin/sft-sharded}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$work"
if [[ ! -f "$work/llama1b/config.json" ]]; then
  JAX_PLATFORMS=cpu "$python" - "$work/llama1b" <<'PY'
import sys

import jax
import jax.numpy as jnp

from sft_sharded import Decoder
from sft_sharded.hf.weights import save_pretrained
from sft_sharded.models import preset
from sft_sharded.parallel.sharding import unbox

cfg = preset("llama3.2-1b", param_dtype="bfloat16")
params = jax.jit(lambda k: unbox(Decoder(cfg).init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(jax.random.key(0))
save_pretrained(params, cfg, sys.argv[1], dtype="bfloat16", model_type="llama")
PY
fi
du -sh "$work/llama1b"
common=(model.path="$work/llama1b" lora.rank=8 steps=1 data.max_length=512 eval.every=0 eval.num_generate=0
        data.num_eval=1 checkpoint.every=0 log_every=1 optim.warmup_steps=0)
rm -rf "$work/run8" "$work/run1"
echo "== 8 simulated devices, batch 8 (expect a refusal before the first step)"
/usr/bin/time -f "exit %x, peak RSS %M KiB, %e s" "$bin" train run_dir="$work/run8" data.batch_size=8 "${common[@]}" \
  2>&1 | grep -E "^(sft-sharded|memory|exit)" || true
# Twice: the defaults (unrolled layers, no remat), then a scanned stack with full remat, which keeps one
# layer's compute-dtype weights alive at a time instead of every layer's.
for layers in "model.scan_layers=false model.remat=none" "model.scan_layers=true model.remat=full"; do
  echo "== 1 device, batch 1, $layers"
  rm -rf "$work/run1"
  # shellcheck disable=SC2086  # $layers is two KEY=VALUE words
  /usr/bin/time -f "exit %x, peak RSS %M KiB, %e s" "$bin" train simulate_devices=1 mesh.data=1 mesh.fsdp=1 \
    mesh.tensor=1 run_dir="$work/run1" data.batch_size=1 "${common[@]}" $layers 2>&1 |
    grep -E "^(sft-sharded|memory|step|trained|exit)"
done
