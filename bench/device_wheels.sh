#!/usr/bin/env bash
# Run here, before bench/device_check.sh goes to a lent GPU machine (the device tool): download into .whl/ the wheels
# that machine's image lacks, for its Python 3.12, at the versions this checkout's .venv runs. Its image holds torch,
# numpy, accelerate, safetensors, tokenizers, click, tqdm, matplotlib, h5py, hypothesis and pytest, but transformers
# 5.17 (spikecompile needs >= 5.25, which needs huggingface-hub >= 2.4) and no pydantic, gguf or nir
# (/work/.library/device/KINDS.md lists the image). .whl/ is git-ignored; the device run carries it.
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDED="transformers huggingface-hub hf-xet httpx2 httpcore2 truststore kernels tomlkit pydantic pydantic-core
        annotated-types typing-inspection gguf nir"
rm -rf .whl && mkdir .whl
for name in $NEEDED; do
    version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
done
ls .whl && du -sh .whl
