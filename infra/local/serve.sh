#!/usr/bin/env bash
# The local dashboard stack, all on loopback: a Prefect server, an MLflow server, the `local-process`
# work pool with prefect.yaml deployed to it, and one process worker.
#   bash infra/local/serve.sh        (make serve)     then open http://127.0.0.1:4200
#   bash infra/local/stop.sh         (make stop)
# State lives under .serve/ (Prefect's home and database, pid files, logs); MLflow uses the same
# mlflow.db and mlartifacts/ as `ftflow run`, so CLI runs and dashboard runs sit side by side.
# Ports and the state folder can be changed: PREFECT_PORT, MLFLOW_PORT, FTFLOW_SERVE_DIR.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
export PWD  # prefect.yaml's pull step sends each flow run to "{{ $PWD }}", the repository root

VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
SERVE_DIR="${FTFLOW_SERVE_DIR:-$REPO/.serve}"
PIDS="$SERVE_DIR/pids"
LOGS="$SERVE_DIR/logs"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
POOL=local-process  # the work pool named in prefect.yaml
PREFECT_URL="http://127.0.0.1:$PREFECT_PORT"
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"

for tool in prefect mlflow; do
  [[ -x "$VENV_BIN/$tool" ]] || { echo "serve: $VENV_BIN/$tool not found; run 'make install' first" >&2; exit 1; }
done

mkdir -p "$PIDS" "$LOGS"

# Refuse to start twice; forget pid files whose process is gone.
for pidfile in "$PIDS"/*.pid; do
  [[ -e "$pidfile" ]] || continue
  if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "serve: already running ($(basename "$pidfile" .pid) pid $(cat "$pidfile")); stop it with: bash infra/local/stop.sh" >&2
    exit 1
  fi
  rm -f "$pidfile"
done

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$PREFECT_PORT" "$MLFLOW_PORT"; do
  if port_busy "$port"; then
    echo "serve: port $port on 127.0.0.1 is taken by another program; set PREFECT_PORT / MLFLOW_PORT" >&2
    exit 1
  fi
done

# Everything below talks to the loopback server, keeps Prefect's state out of ~/.prefect and never prompts.
export PREFECT_HOME="$SERVE_DIR/prefect"
export PREFECT_API_URL="$PREFECT_URL/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1
export PREFECT_CLI_PROMPT=false
unset PREFECT_API_KEY

started=()
cleanup_on_failure() {
  echo "serve: start-up failed; stopping what was started" >&2
  bash "$REPO/infra/local/stop.sh" >&2 || true
}
trap cleanup_on_failure ERR

# start NAME LOGFILE CMD...: in its own session, so stop.sh can end its whole process group.
start() {
  local name="$1" log="$2"; shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
  started+=("$name")
}

wait_http() {  # NAME URL PIDNAME LOG
  local name="$1" url="$2" pidname="$3" log="$4" deadline=$((SECONDS + 180))
  until curl -fs -o /dev/null --max-time 3 "$url"; do
    if ! kill -0 "$(cat "$PIDS/$pidname.pid")" 2>/dev/null; then
      echo "serve: $name exited; last lines of $log:" >&2; tail -n 30 "$log" >&2; return 1
    fi
    if ((SECONDS > deadline)); then
      echo "serve: $name did not answer $url within 180 s; see $log" >&2; return 1
    fi
    sleep 1
  done
  echo "serve: $name is up ($url)"
}

echo "serve: starting the Prefect server on $PREFECT_URL and the MLflow server on $MLFLOW_URL"
start prefect-server "$LOGS/prefect-server.log" \
  "$VENV_BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
start mlflow-server "$LOGS/mlflow-server.log" \
  "$VENV_BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$REPO/mlflow.db" --artifacts-destination "$REPO/mlartifacts"
wait_http "Prefect server" "$PREFECT_URL/api/health" prefect-server "$LOGS/prefect-server.log"
wait_http "MLflow server" "$MLFLOW_URL/health" mlflow-server "$LOGS/mlflow-server.log"

if ! "$VENV_BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1; then
  "$VENV_BIN/prefect" work-pool create "$POOL" --type process >"$LOGS/work-pool.log" 2>&1 \
    || { cat "$LOGS/work-pool.log" >&2; false; }
fi
echo "serve: work pool '$POOL' ready"

if ! "$VENV_BIN/prefect" --no-prompt deploy --all >"$LOGS/deploy.log" 2>&1; then
  echo "serve: 'prefect deploy --all' failed:" >&2; tail -n 40 "$LOGS/deploy.log" >&2; false
fi
grep -o "Deployment '[^']*' successfully created" "$LOGS/deploy.log" | sed 's/^/serve: /'

# The worker's environment is what every flow run inherits.
start worker "$LOGS/worker.log" env \
  MLFLOW_TRACKING_URI="$MLFLOW_URL" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  GX_ANALYTICS_ENABLED=false \
  "$VENV_BIN/prefect" worker start --pool "$POOL" --name "ftflow-local-$(hostname)"
deadline=$((SECONDS + 120))
until grep -q "started!" "$LOGS/worker.log" 2>/dev/null; do
  if ! kill -0 "$(cat "$PIDS/worker.pid")" 2>/dev/null || ((SECONDS > deadline)); then
    echo "serve: the worker did not start; last lines of $LOGS/worker.log:" >&2; tail -n 30 "$LOGS/worker.log" >&2; false
  fi
  sleep 1
done
echo "serve: worker polling '$POOL'"
trap - ERR

cat <<EOF

  Prefect dashboard  $PREFECT_URL
  MLflow UI          $MLFLOW_URL
  logs               $LOGS/{prefect-server,mlflow-server,deploy,worker}.log

  Start a run from the dashboard: Deployments -> fine-tune / retrain -> Run -> Custom run,
  edit fields of 'config' (e.g. lora.r, sft.max_steps) -> Submit; the flow run page shows the
  logs, a progress artifact while training and a summary artifact linking the MLflow run.
  From a shell:  PREFECT_API_URL=$PREFECT_URL/api $VENV_BIN/prefect deployment run fine-tune/retrain
  Stop everything: bash infra/local/stop.sh
EOF
