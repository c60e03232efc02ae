#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (issue 15's GPU figures). Here first: `bash bench/device_wheels.sh`;
# then through the device tool, from the repository root:
#     run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=590)
# It runs the CUDA tests (pytest -m cuda), then bench/scale.py on the GPU: the LLaMA-2-7B shape in bf16 at 8 and the
# full 32 decoder layers (targets: 32 layers converted within 180 s, peak GPU memory within one layer + activations
# + 4 GiB). Everything lands in $OUT (the device tool brings it back): env.txt, cuda_tests.txt, scale.txt,
# scale_cuda.json. The image's python3 holds torch; .whl/ adds what it lacks (bench/device_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: the carried wheels did not install; run bench/device_wheels.sh here and carry .whl"; exit 2; }
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
{ nvidia-smi -L; nproc; python3 -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch',
  torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
# only the files that hold CUDA tests: the others may import what the image lacks (lava, lm-eval) when collected
timeout "${TESTS_S:-180}" python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" \
    $(grep -l "mark.cuda" tests/test_*.py) 2>&1 \
    | tee "$OUT/cuda_tests.txt" | tail -30
timeout "${SCALE_S:-360}" python3 bench/scale.py --device cuda --depths ${DEPTHS:-8 32} --workdir /tmp/scale \
    --results "$OUT/scale_cuda.json" 2>&1 | tee "$OUT/scale.txt"
