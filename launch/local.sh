#!/usr/bin/env bash
# Run COMMAND as N jax.distributed processes on this machine (CPU), to test the multi-host
# path without a cluster: each process gets D CPU devices (default 8 / N) and the
# coordinator address, process count and id that sdjax.parallel.distributed reads.
#
#   launch/local.sh -n 2 -- sdjax train --config configs/toy.py --workdir /tmp/run
#   launch/local.sh -n 2 -d 4 -- python my_script.py
#
# Output lines are prefixed with the process id. Each process runs in its own process
# group. The exit status is the first failure's: once a process fails, the others get
# SIGTERM (sdjax saves and exits 75 if it can) and, GRACE seconds later (default 30,
# SDJAX_LAUNCH_GRACE), SIGKILL, children included. SIGINT/SIGTERM to this script are
# passed on the same way, so Ctrl-C stops a training run with a checkpoint.
set -euo pipefail

usage() { echo "usage: $0 -n N [-d DEVICES_PER_PROCESS] [-p PORT] -- COMMAND..." >&2; exit 2; }
n=""; devices=""; port="${SDJAX_COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}"
grace="${SDJAX_LAUNCH_GRACE:-30}"
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]] || [ $# -eq 0 ]; then usage; fi
devices="${devices:-$(( 8 / n > 0 ? 8 / n : 1 ))}"

command -v setsid >/dev/null || { echo "$0: needs setsid (util-linux)" >&2; exit 2; }
logs="$(mktemp -d)"
pids=(); printers=()
for ((i = 0; i < n; i++)); do
  mkfifo "$logs/$i"
  # The printers ignore Ctrl-C (they share the terminal's process group): they must keep
  # reading while the processes save their checkpoint.
  (trap '' INT TERM; exec sed -u "s/^/[${i}] /" < "$logs/$i") &
  printers+=($!)
  # setsid: a process group (and session) of its own, so a signal to the group reaches
  # the command and whatever it started (grain workers, shells), and nothing else.
  setsid env JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" \
    JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
    "$@" > "$logs/$i" 2>&1 < /dev/null &
  pids+=($!)
done

running() {  # the process groups with a member still alive
  local pid
  for pid in "${pids[@]}"; do
    if kill -0 -- "-$pid" 2>/dev/null; then echo "$pid"; fi
  done
}

stop_all() {  # SIGTERM every group, SIGKILL what is left after the grace period
  local pid waited=0
  for pid in $(running); do kill -TERM -- "-$pid" 2>/dev/null || true; done
  while [ -n "$(running)" ] && [ "$waited" -lt $((grace * 10)) ]; do
    sleep 0.1 || true; waited=$((waited + 1))  # (a Ctrl-C also hits sleep)
  done
  for pid in $(running); do kill -KILL -- "-$pid" 2>/dev/null || true; done
}

interrupted=""
trap 'interrupted=1; stop_all' INT TERM

# Poll rather than `wait -n`: bash forgets a job that `wait -n` has not reported once it
# is reaped in the background, but `wait PID` still finds its status.
status=0
left=("${pids[@]}")
while [ "${#left[@]}" -gt 0 ]; do
  still=(); failed=""
  for pid in "${left[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    code=0
    wait "$pid" || code=$?
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; failed=1; fi
  done
  left=("${still[@]}")
  if [ -n "$failed" ]; then stop_all; fi
  if [ "${#left[@]}" -gt 0 ]; then sleep 0.2 || true; fi
done
# A process group can outlive its leader (a child that ignored the leader's exit).
stop_all
wait "${printers[@]}" 2>/dev/null || true
rm -rf "$logs"
if [ "$status" -eq 0 ] && [ -n "$interrupted" ]; then status=130; fi
exit "$status"
