#!/usr/bin/env bash
# Install, lint, type-check and run the test suite. Needs Redis (127.0.0.1:6379) and PostgreSQL
# (127.0.0.1:5432, trust auth); without them those tests skip, unless CI=true, where they fail.
# A lint or type error fails the run before any test starts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh worker,dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # its configuration, [tool.mypy] in pyproject.toml, names the packages: api, mlxq, worker
exec .venv/bin/python -m pytest "$@"
