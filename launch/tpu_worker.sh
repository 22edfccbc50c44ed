#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh: runs on every TPU VM of a pod slice, from the
# package copy that tpu_pod.sh syncs to ~/sdjax (SDJAX_HOME).
#
#   tpu_worker.sh setup           ~/sdjax/.venv with sdjax[tpu] (pyproject's pins) on Python
#                                 >= 3.11: the image's, else a standalone build (pinned uv)
#   tpu_worker.sh start -- CMD... run CMD in the venv, detached (survives the ssh session),
#                                 output appended to ~/sdjax/logs/<host>.log
#   tpu_worker.sh status [LINES]  running or exit status, then the log's last LINES lines
#   tpu_worker.sh stop [--now]    SIGTERM (sdjax: every worker saves the same step and exits
#                                 75), SIGKILL after GRACE s (default 300); --now: SIGKILL
set -euo pipefail

UV_VERSION=0.13.8        # pinned: the same Python build on every worker
PYTHON_VERSION=3.11      # sdjax's oldest Python; installed when the image's is older
home="${SDJAX_HOME:-$HOME/sdjax}"
host="$(hostname -s)"
log="$home/logs/$host.log"
pidfile="$home/run/pid"
statusfile="$home/run/exit_status"

say() { echo "[$host] $*"; }
usage() { echo "usage: $0 setup | start -- COMMAND... | status [LINES] | stop [--now]" >&2; exit 2; }

running_pid() {  # the wrapper's pid while the run is alive
  local pid
  [ -f "$pidfile" ] || return 1
  pid="$(cat "$pidfile")"
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

uv() {  # a pinned uv, installed for this user on first use
  local have=""
  [ -x "$HOME/.local/bin/uv" ] && have="$("$HOME/.local/bin/uv" --version)"
  case "$have" in
    "uv $UV_VERSION"*) ;;
    *) # (images with an externally managed Python need the override; older pips ignore it)
      PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user "uv==$UV_VERSION" >&2 ;;
  esac
  "$HOME/.local/bin/uv" "$@"
}

setup() {
  cd "$home"
  # The image's Python when it is new enough, else a standalone CPython 3.11 that uv
  # downloads (the version the pins are tested on); uv also spares images without venv.
  local python="$PYTHON_VERSION"
  if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python="$(command -v python3)"
  fi
  [ -x .venv/bin/python ] || uv venv --seed --python "$python" .venv
  uv pip install -q --python .venv/bin/python -e ".[${SDJAX_EXTRAS:-tpu}]"
  say "installed: $(.venv/bin/python -c 'import sys, jax, sdjax; print("python", sys.version.split()[0], "sdjax", sdjax.__version__, "jax", jax.__version__)')"
}

start() {
  [ $# -gt 0 ] || usage
  cd "$home"
  if pid="$(running_pid)"; then say "already running (pid $pid); stop it first" >&2; exit 1; fi
  [ -f .venv/bin/activate ] || { say "no $home/.venv: run setup first" >&2; exit 1; }
  mkdir -p logs run
  rm -f "$statusfile"
  echo "=== $(date -u +%FT%TZ) start: $*" >> "$log"
  # setsid: its own session, so the run outlives the ssh session that started it. The
  # wrapper passes SIGTERM on to the command and records the command's exit status.
  # shellcheck disable=SC2016  # expanded by the wrapper shell
  setsid bash -c '
    source .venv/bin/activate
    trap "kill -TERM \$child 2>/dev/null" TERM
    "$@" &
    child=$!
    while :; do
      status=0; wait "$child" || status=$?
      kill -0 "$child" 2>/dev/null || break
    done
    echo "$status" > "$0"
    echo "=== $(date -u +%FT%TZ) exit $status" >&2
  ' "$statusfile" "$@" >> "$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  say "started (pid $!), log $log"
}

status() {
  local lines="${1:-5}"
  if pid="$(running_pid)"; then
    say "running (pid $pid)"
  elif [ -f "$statusfile" ]; then
    say "exited $(cat "$statusfile")"
  elif [ -f "$pidfile" ]; then
    say "not running (killed: no exit status)"
  else
    say "never started"
  fi
  if [ -f "$log" ]; then tail -n "$lines" "$log" | sed "s/^/[$host]   /"; fi
}

stop() {
  local pid waited=0
  if ! pid="$(running_pid)"; then say "not running"; return; fi
  if [ "${1:-}" = "--now" ]; then
    kill -KILL -- "-$pid" 2>/dev/null || true
    say "killed"
    return
  fi
  kill -TERM "$pid"
  say "SIGTERM sent; waiting for the checkpoint"
  while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$(( ${GRACE:-300} * 10 ))" ]; do
    sleep 0.1 || true; waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || true
    say "still running after ${GRACE:-300} s: killed"
  else
    say "exited $(cat "$statusfile" 2>/dev/null || echo '?')"
  fi
}

case "${1:-}" in
  setup) setup ;;
  start) shift; [ "${1:-}" = "--" ] && shift; start "$@" ;;
  status) shift; status "$@" ;;
  stop) shift; stop "$@" ;;
  *) usage ;;
esac
