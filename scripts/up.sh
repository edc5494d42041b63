#!/usr/bin/env bash
# Quick start: install what is missing, then run the whole system on its embedded defaults
# (embedded Redis, gateway :8000, one worker, model-manager :8001, UI :3000, model tiny-shakespeare).
# Ctrl-C stops everything. Environment variables (see .env.example) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh all
if [ -f .env ]; then set -a; . ./.env; set +a; fi
exec .venv/bin/spindle up "$@"
