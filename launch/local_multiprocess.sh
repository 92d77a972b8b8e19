#!/usr/bin/env bash
# Start N processes on this machine, each with D simulated CPU devices, as one jax.distributed job:
#   launch/local_multiprocess.sh N D -- train run_dir=runs/mp steps=20
# Logs: $SFT_LOG_DIR (default logs/multiprocess-<time>)/process_I.log; process 0 is also shown here.
# If one process fails, the others are killed and the script exits with that process's status.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- <sft-sharded arguments>" >&2
  exit 2
fi
num=$1 devices=$2
shift 2
[[ "${1:-}" == "--" ]] && shift
sft=${SFT_BIN:-sft-sharded}
log_dir=${SFT_LOG_DIR:-logs/multiprocess-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$log_dir"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

declare -A index_of
pids=()
for ((i = 0; i < num; i++)); do
  env SFT_COORDINATOR="127.0.0.1:$port" SFT_NUM_PROCESSES="$num" SFT_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
    $sft "$@" "simulate_devices=$devices" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
  index_of[$!]=$i
done
tail -n +1 -f "$log_dir/process_0.log" --pid "${pids[0]}" &
tail_pid=$!

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  finished=""
  set +e
  wait -n -p finished "${running[@]}"
  code=$?
  set -e
  still=()
  for p in "${running[@]}"; do
    if [[ "$p" != "$finished" ]]; then still+=("$p"); fi
  done
  running=("${still[@]+"${still[@]}"}")
  if [[ $code -ne 0 ]]; then
    i=${index_of[$finished]}
    echo "local_multiprocess: process $i of $num exited with status $code (log: $log_dir/process_$i.log); stopping the others" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2
    kill "${running[@]}" 2>/dev/null || true
    status=$code
    break
  fi
done
wait "$tail_pid" 2>/dev/null || true
exit $status
