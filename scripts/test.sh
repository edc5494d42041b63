#!/usr/bin/env bash
# Install what is missing (Python packages, and as root the system tools the tests use: Chromium,
# docker-compose, promtool), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
scripts/install-test-tools.sh
. .venv/bin/activate
ruff check .
exec python -m pytest -q -ra "$@"
