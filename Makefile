# The two set-up commands of the README are `make demo` and `make test`; both install what they need.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-cpu-capabilities test-slow test-cuda bench

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

install: $(STAMP)

# Main job: convert the embedded SmolLM2-135M-Instruct at T=8, print SNN vs ANN perplexity, then simulate it
# and print its energy per token beside the ANN's (report in out/smollm2-t8-sim/report.md).
demo: install
	mkdir -p out
	$(BIN)/spikecompile convert -o out/smollm2-t8.pt --timesteps 8
	$(BIN)/spikecompile eval out/smollm2-t8.pt --max-windows 8
	$(BIN)/spikecompile build out/smollm2-t8.pt --target sim -o out/smollm2-t8-sim --windows 1 --mode decoded

# Default test suite: the import contracts (pyproject's [tool.importlinter]), then the self-contained tests on tiny
# random LLaMA models (a few minutes).
test: install
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest

# The numeric tests again under each other CPU capability torch can dispatch to (ATEN_CPU_CAPABILITY): float results
# must not depend on the kernels' rounding. `make test` ran the native one; one the CPU lacks either falls back
# silently (torch reports another) or, in torch 2.13 on an AVX2-only CPU asked for avx512, is taken and dies of an
# illegal instruction: the probe runs a vectorized op under it, and a capability that does not run is skipped too.
CPU_CAPABILITIES := default avx2 avx512
NUMERIC_TESTS := tests/test_build.py tests/test_fold_hadamard.py tests/test_passes.py tests/test_codings.py tests/test_grains.py \
	tests/test_frontend.py tests/test_sim.py tests/test_kernel.py tests/test_rotation.py
CAPABILITY := $(BIN)/python -c "import torch; torch.randn(4096).exp().softmax(0).sum().item(); \
	print(torch.backends.cpu.get_cpu_capability().lower())" 2>/dev/null

test-cpu-capabilities: install
	native=$$(env -u ATEN_CPU_CAPABILITY $(CAPABILITY)); \
	for cap in $(CPU_CAPABILITIES); do \
		got=$$(ATEN_CPU_CAPABILITY=$$cap $(CAPABILITY)); \
		if [ -z "$$got" ]; then echo "ATEN_CPU_CAPABILITY=$$cap: skipped (this CPU cannot run its kernels)"; continue; fi; \
		if [ "$$got" != "$$cap" ]; then echo "ATEN_CPU_CAPABILITY=$$cap: skipped (this CPU runs $$got)"; continue; fi; \
		if [ "$$got" = "$$native" ]; then echo "ATEN_CPU_CAPABILITY=$$cap: skipped (native: make test ran it)"; continue; fi; \
		echo "ATEN_CPU_CAPABILITY=$$cap: torch runs $$got"; \
		ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest -q -p no:cacheprovider $(NUMERIC_TESTS) || exit 1; \
	done

# CUDA tests (marked cuda; they also run, and skip, in `make test` on a machine without a GPU).
test-cuda: install
	$(BIN)/python -m pytest -m cuda

# Slow tests: the real SmolLM2 end to end (and ../shared data where present).
test-slow: install
	$(BIN)/python -m pytest -m slow

# Benchmarks on SmolLM2 with ../shared/data (each writes bench/results/<name>.json); long: run on a quiet machine.
BENCHES := convert_smollm2 ir_smollm2 sim_smollm2 nir_smollm2 lava_loihi onnx_smollm2 loihi_fixed loihi_fixed_speed \
	spike_penalty signed_digits offset_sites frontier sdllm_sites neuron_kernel qwen_coder scale build_scale sim_windows \
	smollm2_convert_time

bench: install
	for name in $(BENCHES); do $(BIN)/python bench/$$name.py || exit 1; done
