#!/usr/bin/env bash
# Run COMMAND as N jax.distributed processes on this machine (CPU), to test the multi-host
# path without a cluster: each process gets D CPU devices (default 8 / N) and the
# coordinator address, process count and id that sdjax.parallel.distributed reads.
#
#   launch/local.sh -n 2 -- sdjax train --config configs/toy.py --workdir /tmp/run
#   launch/local.sh -n 2 -d 4 -- python my_script.py
#
# Output lines are prefixed with the process id; the exit status is the first failure's.
set -euo pipefail

usage() { echo "usage: $0 -n N [-d DEVICES_PER_PROCESS] [-p PORT] -- COMMAND..." >&2; exit 2; }
n=""; devices=""; port="${SDJAX_COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}"
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[ -n "$n" ] && [ "$n" -ge 1 ] && [ $# -gt 0 ] || usage
devices="${devices:-$(( 8 / n > 0 ? 8 / n : 1 ))}"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup INT TERM
for ((i = 0; i < n; i++)); do
  (
    export JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" \
      JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
      XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
    "$@" 2>&1 | sed -u "s/^/[${i}] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    code=$?
    [ "$status" -eq 0 ] && status=$code && cleanup
  fi
done
exit "$status"
