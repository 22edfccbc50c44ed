#!/usr/bin/env bash
# Run an sdjax command on every worker of a Cloud TPU pod slice (one process per host).
# jax detects the pod itself (sdjax.parallel.distributed), so the same command runs on all
# workers; the checkpoint/data paths must be shared (e.g. gs:// or a mounted filesystem).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- sdjax train --config configs/sd2_base.py \
#       --workdir gs://bucket/runs/sd2 --set init.pretrained=... --set data.path=...
#
# First time: launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] --setup  (installs sdjax[tpu] from
# this checkout on every worker).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 TPU_NAME ZONE [PROJECT] (--setup | -- COMMAND...)" >&2; exit 2; }
name="$1"; zone="$2"; shift 2
project=()
if [ "$1" != "--" ] && [ "$1" != "--setup" ]; then project=(--project "$1"); shift; fi
ssh=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all)

if [ "$1" = "--setup" ]; then
  gcloud compute tpus tpu-vm scp --recurse "$(cd "$(dirname "$0")/.." && pwd)" \
    "$name":~/sdjax --zone "$zone" "${project[@]}" --worker=all
  "${ssh[@]}" --command "cd ~/sdjax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
  exit 0
fi
shift  # the --
printf -v cmd '%q ' "$@"
"${ssh[@]}" --command "cd ~/sdjax && . .venv/bin/activate && ${cmd}"
