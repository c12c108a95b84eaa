#!/usr/bin/env bash
# Install everything (once), lint and check formatting (ruff, settings in pyproject.toml), run the test suite on the
# pinned stack (.venv, constraints.txt), then the compatibility subset on the current stack (.venv-current,
# constraints-current.txt: transformers 5, no optimum). Any failure of either fails; pytest's exit 5 (no tests
# collected) is a failure. Arguments go to the pinned run; QPEFT_CURRENT=0 leaves the subset out.
set -uo pipefail
cd "$(dirname "$0")/.."
current=${QPEFT_CURRENT:-1}
if [ "$current" = 1 ]; then bash scripts/setup.sh --current || exit 1; else bash scripts/setup.sh || exit 1; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check . || { echo "ruff check failed" >&2; exit 1; }
.venv/bin/ruff format --check . >/dev/null || { .venv/bin/ruff format --diff . | head -40; echo "ruff format --check failed (run: ruff format .)" >&2; exit 1; }
status() {  # pytest's exit code, with 5 (nothing collected) made a failure
  if [ "$1" -eq 5 ]; then echo "no tests were collected ($2): failing" >&2; echo 1; else echo "$1"; fi
}
.venv/bin/python -m pytest -q "$@"
rc=$(status $? "pinned stack")
[ "$current" = 1 ] || exit "$rc"
# The compatibility subset: attach, the .qpeft file, merge, ONNX, the LoRA bridge, the PEFT method and folders, models,
# the ViT
subset=(tests/test_attach.py tests/test_layer.py tests/test_qpeft_file.py tests/test_merge.py
  tests/test_onnx_export.py tests/test_ort_session.py tests/test_lora_export.py tests/test_lora_import.py
  tests/test_peft_native.py tests/test_peft_folder.py tests/test_models.py tests/test_vision.py)
echo "===== compatibility subset on the current stack: .venv-current, $(.venv-current/bin/python -c \
  'import transformers; print("transformers", transformers.__version__)'), no optimum ====="
# Left out there: the byte-level fuzzing of the file readers (every bit flipped, mutated files), which runs
# no transformers code and takes most of these files' time; the pinned run covers it
SECONDS=0
.venv-current/bin/python -m pytest -q -p no:cacheprovider "${subset[@]}" \
  -k "not bit_flip and not flipped_bit and not mutated_files"
rc2=$(status $? "current stack")
echo "===== compatibility subset: exit $rc2 in ${SECONDS} s; pinned suite: exit $rc ====="
[ "$rc" -eq 0 ] && [ "$rc2" -eq 0 ]
