#!/usr/bin/env bash
# Install everything (once) and run the end-to-end demo on the shipped MiniLM and data: Quantum-PEFT adapters in the
# accuracy study's recommended setting, trained beside PEFT LoRA r=8 and head-only; artefacts in demo-out/.
# `./scripts/demo.sh llm` runs the LLM demo instead: two SmolLM2 task adapters, one base, per-request adapters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${1:-}" = llm ]; then
  shift
  exec .venv/bin/python samples/demo_llm.py "$@"
fi
exec .venv/bin/python samples/demo.py "$@"
