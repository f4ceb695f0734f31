#!/usr/bin/env bash
# Simulator fast mode under wrk: sim pinned to CPU 0, wrk pinned to CPU 1.
# Usage: bench/sim/run.sh [duration=10s] [connections=32]
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION="${1:-10s}"
CONNECTIONS="${2:-32}"
PORT="${PORT:-23499}"
PY="${PYTHON:-.venv/bin/python}"

taskset -c 0 "$PY" -m lmfleet.sim --port "$PORT" --fast --log-level error &
SIM_PID=$!
trap 'kill "$SIM_PID" 2>/dev/null; wait "$SIM_PID" 2>/dev/null || true' EXIT

for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 0.1
done

echo "sanity: $(curl -s -H 'content-type: application/json' \
  -d '{"model":"internlm/internlm2_5-7b-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":8}' \
  "http://127.0.0.1:$PORT/v1/chat/completions" | head -c 120)..."
taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency \
  -s bench/sim/chat.lua "http://127.0.0.1:$PORT/v1/chat/completions"
curl -s "http://127.0.0.1:$PORT/sim/stats"; echo
