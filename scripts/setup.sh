#!/usr/bin/env bash
# Idempotent install: a .venv with mlxq, its worker (MLX) and dev extras, and on Linux the system
# OpenBLAS that makes MLX's CPU matmul fast. Usage: scripts/setup.sh [extras], default worker,dev.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-worker,dev}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

if [[ "$(uname -s)" == "Linux" ]] && ! ldconfig -p 2>/dev/null | grep -q libopenblas.so.0; then
  SUDO=""; [[ "$(id -u)" != "0" ]] && SUDO="sudo"
  if command -v apt-get >/dev/null; then
    $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null; }
  else
    echo "warning: install OpenBLAS (libopenblas.so.0) for fast MLX on CPU" >&2
  fi
fi

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
STAMP=".venv/.mlxq-installed-$EXTRAS-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [[ ! -f "$STAMP" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import mlxq, api, worker" && touch "$STAMP"
fi
