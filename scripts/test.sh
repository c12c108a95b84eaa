#!/usr/bin/env bash
# Install everything (once), lint and check formatting (ruff, settings in pyproject.toml), run the test suite.
# pytest's exit 5 (no tests collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check . || { echo "ruff check failed" >&2; exit 1; }
.venv/bin/ruff format --check . >/dev/null || { .venv/bin/ruff format --diff . | head -40; echo "ruff format --check failed (run: ruff format .)" >&2; exit 1; }
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
exit "$rc"
