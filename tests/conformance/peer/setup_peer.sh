#!/usr/bin/env bash
# Build .venv-peer: real LMDeploy 0.18.0 (CPU torch, no CUDA) for the conformance suite.
#
# Idempotent and cached: a stamp keyed on this script's recipe is written last; a venv
# whose stamp matches and whose `import lmdeploy.serve.openai.api_server` works is
# reused. On failure the reason goes to .venv-peer.failed (read by the tests' skip
# message) and the script exits 0 unless PEER_STRICT=1, so `make test` goes on.
set -u
cd "$(dirname "$0")/../../.."
VENV=${PEER_VENV:-.venv-peer}
PYTHON=${PYTHON:-python3}
FAILED=$VENV.failed
LIMIT=${PEER_SETUP_TIMEOUT:-900}

TORCH="torch==2.13.0"             # a CPU build (local wheel here); lmdeploy pins <=2.12.1 -> --no-deps
LMDEPLOY="lmdeploy==0.18.0"
# Only what the api_server path imports (found by trying); lmdeploy's full metadata
# would pull triton, nvidia-*, ray, xgrammar, tilelang, ...
DEPS=("transformers>=4.56,<5" fastapi uvicorn mmengine-lite shortuuid pybase64 pillow
      psutil requests prometheus_client "openai>=2.45" pydantic numpy safetensors
      partial_json_parser fire pyzmq aiohttp tokenizers)
RECIPE="$TORCH $LMDEPLOY ${DEPS[*]}"
STAMP_VALUE=$(printf '%s' "$RECIPE" | sha256sum | cut -c1-16)
STAMP=$VENV/.peer-stamp

works() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_VALUE" ] &&
    "$VENV/bin/python" -c "import lmdeploy.serve.openai.api_server" >/dev/null 2>&1
}

fail() {
  echo "peer venv: $1" | tee "$FAILED" >&2
  [ "${PEER_STRICT:-0}" = 1 ] && exit 1
  exit 0
}

if works; then
  echo "peer venv: $VENV is up to date"
  rm -f "$FAILED"
  exit 0
fi

build() {
  set -e
  rm -f "$STAMP"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  # Refuse to go on if anything CUDA-ish would be pulled.
  plan=$("$VENV/bin/python" -m pip install --dry-run --disable-pip-version-check \
         "$TORCH" "${DEPS[@]}" 2>/dev/null | grep '^Would install' || true)
  if echo "$plan" | grep -Eiq 'nvidia|triton|cuda'; then
    echo "refusing: the plan pulls CUDA packages: $plan" >&2
    return 3
  fi
  "${PIP[@]}" "$TORCH"
  "${PIP[@]}" --no-deps "$LMDEPLOY"
  "${PIP[@]}" "${DEPS[@]}"
  "$VENV/bin/python" -c "import lmdeploy.serve.openai.api_server"
  echo "$STAMP_VALUE" > "$STAMP"
}

export -f build
export VENV PYTHON TORCH LMDEPLOY STAMP STAMP_VALUE
export DEPS_STR="${DEPS[*]}"
start=$(date +%s)
if ! timeout "$LIMIT" bash -c 'DEPS=($DEPS_STR); '"$(declare -f build)"'; build' 2>"$VENV.log"; then
  fail "set-up failed or timed out after $(( $(date +%s) - start ))s (see $VENV.log): $(tail -3 "$VENV.log" | tr '\n' ' ')"
fi
rm -f "$FAILED"
echo "peer venv: built in $(( $(date +%s) - start ))s ($(du -sh "$VENV" | cut -f1))"
