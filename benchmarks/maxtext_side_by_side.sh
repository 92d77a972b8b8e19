#!/usr/bin/env bash
# sft_sharded's step_throughput.py and MaxText on the same CPU, same shapes, alternating run by run so that
# both see the same machine state. Prints one JSON line per run.
#
# usage: benchmarks/maxtext_side_by_side.sh [ROUNDS]
#   PY=...        the Python that has sft_sharded installed (use one with the same jax as MaxText's venv:
#                 Python 3.12, jax 0.12; MaxText itself installs into its own venv on first use)
#   MAXTEXT=...   the MaxText measuring script (default ../shared/tools/maxtext_cpu_baseline.sh)
# Shapes (the performance issue's): hidden 256, 4 layers, 8 heads x 32, 8 kv heads, mlp 1024, vocab 8192,
# seq 512, 4096 tokens per step, bf16 activations, fp32 params; 1 device, then 8 simulated devices fsdp=8.
# sft_sharded scans over layers without remat (its fastest setting here); MaxText runs its defaults
# (scan, remat full).
set -euo pipefail
rounds=${1:-2}
here=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python3}
MAXTEXT=${MAXTEXT:-$here/../../shared/tools/maxtext_cpu_baseline.sh}
shapes=(--hidden 256 --layers 4 --heads 8 --head-dim 32 --kv-heads 8 --mlp 1024 --vocab 8192 --seq 512
        --batch 8 --dtype bfloat16 --param-dtype float32 --scan --steps 10)
for round in $(seq "$rounds"); do
  for devices in 1 8; do
    if [ "$devices" = 1 ]; then mesh=(--mesh 1,1,1); else mesh=(--mesh 1,8,1 --simulate-devices 8); fi
    ours=$(JAX_PLATFORMS=cpu "$PY" "$here/step_throughput.py" "${shapes[@]}" "${mesh[@]}" 2>/dev/null | tail -n 1)
    "$PY" -c 'import json, sys; r = json.loads(sys.argv[1]); print(json.dumps({"system": "sft_sharded", "round": int(sys.argv[2]), "devices": r["devices"], "tokens_per_sec": round(r["tokens_per_sec"], 1), "step_time_s": round(r["step_time_s"], 4)}))' "$ours" "$round"
    theirs=$(bash "$MAXTEXT" "$devices" 12)
    echo "${theirs%\}}, \"round\": $round}"
  done
done
