#!/usr/bin/env bash
# Run sdjax on every worker of a Cloud TPU pod slice (one process per TPU VM), through
# `gcloud compute tpus tpu-vm ssh/scp --worker=all`.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] --setup
#       sync the package, then on every worker: Python >= 3.11 (the image's, or a pinned
#       standalone build when the image's is older) and ~/sdjax/.venv with sdjax[tpu]
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- sdjax train --config configs/sd2_base.py \
#       --workdir gs://bucket/runs/sd2 --set init.pretrained=... --set data.path=...
#       sync the package, then start COMMAND detached on every worker (it survives this
#       ssh session); each worker logs to ~/sdjax/logs/<host>.log
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] --status [LINES]
#       per worker: running or its exit status, and the log's last lines
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] --stop [--now]
#       SIGTERM on every worker: the run saves one checkpoint at the same step everywhere
#       and exits 75 (rerun the same command to resume); --now: SIGKILL
#
# The sync copies only what the workers run: pyproject.toml, README.md, sdjax/, configs/
# and launch/tpu_worker.sh (not .venv, workdirs or tests). Start-up needs no addresses:
# JAX finds the pod from the TPU VM metadata (sdjax.parallel.distributed). The workdir and
# data must be shared by all workers: gs:// (or a mounted filesystem).
set -euo pipefail

usage() {
  echo "usage: $0 TPU_NAME ZONE [PROJECT] (--setup | --status [LINES] | --stop [--now] | -- COMMAND...)" >&2
  exit 2
}
[ $# -ge 3 ] || usage
name="$1"; zone="$2"; shift 2
where=(--zone "$zone")
case "$1" in
  --setup|--status|--stop|--) ;;
  *) where+=(--project "$1"); shift ;;
esac
[ $# -ge 1 ] || usage
root="$(cd "$(dirname "$0")/.." && pwd)"
worker='bash ~/sdjax/launch/tpu_worker.sh'

on_workers() {  # run a shell command line on every worker
  gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$1"
}

sync_package() {
  local tmp
  tmp="$(mktemp -d)"
  tar -C "$root" --exclude='__pycache__' --exclude='*.pyc' -czf "$tmp/sdjax.tgz" \
    pyproject.toml README.md sdjax configs launch/tpu_worker.sh
  gcloud compute tpus tpu-vm scp "$tmp/sdjax.tgz" "$name:~/sdjax.tgz" "${where[@]}" --worker=all
  rm -rf "$tmp"
  # Replace the code, keep the venv, logs and run state.
  on_workers 'mkdir -p ~/sdjax && cd ~/sdjax && rm -rf sdjax configs launch && tar -xzf ~/sdjax.tgz && rm ~/sdjax.tgz'
}

case "$1" in
  --setup)
    sync_package
    on_workers "$worker setup"
    ;;
  --status)
    shift
    on_workers "$worker status $(printf %q "${1:-5}")"
    ;;
  --stop)
    shift
    on_workers "$worker stop $(printf %q "${1:-}")"
    ;;
  --)
    shift
    [ $# -gt 0 ] || usage
    sync_package
    printf -v cmd '%q ' "$@"
    on_workers "$worker start -- $cmd"
    ;;
  *) usage ;;
esac
