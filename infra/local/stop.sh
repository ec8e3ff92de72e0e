#!/usr/bin/env bash
# Stops what infra/local/serve.sh started (make stop): the worker first, so no new flow run starts,
# then the MLflow and Prefect servers. TERM, up to STOP_GRACE_S (20 s) of grace, then KILL; pid files
# are removed. Flow runs still in progress are children of the worker in sessions of their own: they
# are stopped too, and the Prefect server shows them as Crashed.
# Prefect 3.9's worker turns the first TERM into an interrupt of itself and may then idle without
# exiting; a second TERM is its documented "now exit" (it SIGKILLs itself), so the worker gets one
# after WORKER_GRACE_S (5 s).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SERVE_DIR="${FTFLOW_SERVE_DIR:-$REPO/.serve}"
PIDS="$SERVE_DIR/pids"
GRACE_S="${STOP_GRACE_S:-20}"
WORKER_GRACE_S="${WORKER_GRACE_S:-5}"

descendants() {  # every process below PID (flow runs under the worker)
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

wait_gone() {  # SECONDS PID...: true once none is alive
  local until=$((SECONDS + $1)); shift
  while alive "$@"; do
    ((SECONDS < until)) || return 1
    sleep 0.5
  done
}

stop_one() {
  local name="$1" pidfile="$PIDS/$1.pid"
  [[ -f "$pidfile" ]] || return 0
  local pid; pid="$(cat "$pidfile")"
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "stop: $name (pid $pid) was not running"
    rm -f "$pidfile"
    return 0
  fi
  # serve.sh starts each service as the leader of its own process group; flow runs start their own sessions.
  local targets=("$pid" $(descendants "$pid"))
  local groups=()
  [[ "$(ps -o pgid= -p "$pid" | tr -d ' ')" == "$pid" ]] && groups=("-$pid")
  kill -TERM "${groups[@]}" "${targets[@]}" 2>/dev/null
  local deadline=$((SECONDS + GRACE_S))
  if [[ "$name" == worker ]]; then
    wait_gone "$WORKER_GRACE_S" "${targets[@]}" || kill -TERM "$pid" 2>/dev/null
  fi
  while alive "${targets[@]}" && ((SECONDS < deadline)); do sleep 0.5; done
  if alive "${targets[@]}"; then
    echo "stop: $name did not exit within ${GRACE_S}s; killing it"
    kill -KILL "${groups[@]}" "${targets[@]}" 2>/dev/null
    sleep 0.5
  fi
  rm -f "$pidfile"
  echo "stop: $name stopped (pid $pid)"
}

if [[ ! -d "$PIDS" ]] || ! compgen -G "$PIDS/*.pid" >/dev/null; then
  echo "stop: nothing to stop (no pid files in $PIDS)"
  exit 0
fi
for name in worker mlflow-server prefect-server; do
  stop_one "$name"
done
for pidfile in "$PIDS"/*.pid; do  # anything else a future serve.sh may start
  [[ -e "$pidfile" ]] && stop_one "$(basename "$pidfile" .pid)"
done
exit 0
