#!/usr/bin/env bash
# Run sft-sharded on every worker of an existing Cloud TPU VM pod.
#   launch/tpu_pod.sh --name NAME --zone ZONE [--project P] [--dry-run] [--env K=V ...] -- train KEY=VALUE ...
# 1. copies this checkout (git archive of HEAD) to every worker and installs it with the [tpu] extra;
# 2. runs `sft-sharded <args>` on all workers at once (jax.distributed finds the pod by itself);
# 3. collects each worker's log into $SFT_LOG_DIR (default logs/tpu-<name>-<time>/).
# --dry-run prints the exact gcloud commands instead of running them. GCLOUD overrides the gcloud binary.
set -euo pipefail
name="" zone="" project="" dry_run=0 envs=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_pod: unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$name" || -z "$zone" || $# -eq 0 ]]; then
  echo "usage: $0 --name NAME --zone ZONE [--project P] [--env K=V]... [--dry-run] -- <sft-sharded args>" >&2
  exit 2
fi
gcloud=${GCLOUD:-gcloud}
log_dir=${SFT_LOG_DIR:-logs/tpu-$name-$(date +%Y%m%d-%H%M%S)}
common=(--zone "$zone")
[[ -n "$project" ]] && common+=(--project "$project")
remote_dir='$HOME/sft_sharded'
env_prefix=""
for kv in "${envs[@]+"${envs[@]}"}"; do env_prefix+="$(printf '%q' "$kv") "; done
args=""
for a in "$@"; do args+="$(printf '%q' "$a") "; done

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

archive=$(mktemp -t sft_sharded.XXXXXX.tar.gz)
[[ $dry_run -eq 1 ]] || git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
run "$gcloud" compute tpus tpu-vm scp "$archive" "$name:sft_sharded.tar.gz" --worker=all "${common[@]}"
run "$gcloud" compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command \
  "mkdir -p $remote_dir && tar -xzf sft_sharded.tar.gz -C $remote_dir && pip install -q -e '$remote_dir[tpu]'"
run "$gcloud" compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command \
  "cd $remote_dir && env ${env_prefix}python3 -m sft_sharded.cli ${args}simulate_devices=0 > \$HOME/sft_sharded-\$(hostname).log 2>&1"
mkdir -p "$log_dir"
run "$gcloud" compute tpus tpu-vm scp "$name:sft_sharded-*.log" "$log_dir/" --worker=all "${common[@]}"
rm -f "$archive"
echo "tpu_pod: logs in $log_dir" >&2
