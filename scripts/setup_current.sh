#!/usr/bin/env bash
# The current stack (constraints-current.txt): .venv-current, an overlay of .venv. A .pth file puts .venv's
# site-packages on its path (torch and the rest of constraints.txt are shared, never reinstalled); transformers 5
# and what it needs beyond .venv are installed into it and shadow .venv's copies. optimum is blocked from import
# there (optimum-onnx 0.1 caps transformers <4.58). Run by `scripts/setup.sh --current` after .venv is set up;
# re-running when nothing changed installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-current
stamp=$venv/.qpeft-installed
base=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
want=$( (cat constraints.txt constraints-current.txt scripts/setup_current.sh; echo "$base") | sha256sum | cut -c1-16)
[ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0
[ -x $venv/bin/python ] || "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" -m venv $venv
site=$($venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$base" > "$site/qpeft-pinned-stack.pth"
echo 'import sys; sys.modules.setdefault("optimum", None)  # optimum-onnx 0.1 caps transformers <4.58' \
  > "$site/qpeft-no-optimum.pth"
# pip's output is shown only on failure: on success it lists the expected conflicts with .venv's pins
# (optimum-onnx's and the editable qpeft-deploy's transformers caps), which do not apply here
out=$($venv/bin/python -m pip install -q --disable-pip-version-check -c constraints-current.txt \
  "$(grep -m1 '^transformers==' constraints-current.txt)" 2>&1) || { echo "$out" >&2; exit 1; }
echo "$want" > "$stamp"
