#!/usr/bin/env bash
# One prepared GPU check (H100 / H200; at most 180 s of tests + 4 rows x 100 s = 580 s, under the device
# tool's 600 s per call): the GPU-relevant tests, then train-step throughput
# of a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads / 8 kv, mlp 8192, vocab 128256, tied) at
# seq 4096 in bf16 on one GPU. Prints the card, then step_throughput's table and JSON lines (tokens/s, MFU
# against 989 TFLOP/s bf16 dense). The first row also traces 3 steps and prints where their time goes
# (sft_sharded.step_profile: loss, attention, MLP, optimizer, collectives, the GPU's idle time between
# kernels); the trace itself stays in /tmp on the device machine.
#
# The device machine has Python 3.12, jax 0.11, flax, optax, chex and orbax but no network. Nothing here
# needs grain (the data pipeline is not used); pytest, if missing, is installed from wheels carried in
# benchmarks/wheels (fetch them here first: `pip download pytest -d benchmarks/wheels`, and pass
# carry=["benchmarks/wheels"]).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'

if ! python3 -c 'import pytest' 2>/dev/null; then
  python3 -m pip install -q --no-index --find-links benchmarks/wheels pytest || echo "no pytest: tests skipped"
fi
if python3 -c 'import pytest' 2>/dev/null; then
  # cuDNN attention (values and grads) against the einsum reference, whole rows and one chunk of a split
  # sequence against all its keys; the chunked loss against the plain one.
  SFT_SHARDED_TEST_PLATFORM=gpu timeout 180 python3 -m pytest -q -p no:cacheprovider \
    tests/test_attention.py tests/test_losses.py -k "not splash" --tb=line 2>&1 | tail -n 30 | tee "$OUT/tests.txt"
fi

run() {  # one throughput row; a failure (e.g. out of memory) is printed and the next row still runs
  echo "== ${ROW_ENV:-} step_throughput $*" | tee -a "$OUT/throughput.txt"
  env ${ROW_ENV:-} timeout 100 python3 benchmarks/step_throughput.py --preset llama3.2-1b --seq 4096 \
    --dtype bfloat16 --mesh 1,1,1 --warmup 2 --steps 5 "$@" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" \
    | tail -n 40 | tee -a "$OUT/throughput.txt"
}
# Most important first: the shipped default (scanned, save_dots) with its profile, then the variants the
# last lease left unmeasured: bfloat16 params (no float32 master copy), the whole sequence as one loss
# chunk, XLA's Triton GEMMs off. (Measured on 2026-11-27 and not repeated: no remat unrolled 41.6% MFU,
# save_dots unrolled 39.6%, the blocked XLA attention 15.9%.)
run --batch 4 --remat save_dots --scan --loss-chunk 1024 --attention cudnn --profile /tmp/gpu_profile
run --batch 4 --remat save_dots --scan --loss-chunk 1024 --attention cudnn --param-dtype bfloat16
run --batch 4 --remat save_dots --scan --loss-chunk 4096 --attention cudnn
ROW_ENV="XLA_FLAGS=--xla_gpu_enable_triton_gemm=false" \
  run --batch 4 --remat save_dots --scan --loss-chunk 1024 --attention cudnn
