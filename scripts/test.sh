#!/usr/bin/env bash
# Install and run the test suite. Needs Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, trust
# auth); without them those tests skip, unless CI=true, where they fail.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh worker,dev
exec .venv/bin/python -m pytest "$@"
