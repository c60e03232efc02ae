# The two set-up commands of the README are `make demo` and `make test`; both install what they need.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench

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

# Slow tests: the real SmolLM2 end to end (and ../shared data where present).
test-slow: install
	$(BIN)/python -m pytest -m slow

# Benchmarks on SmolLM2 with ../shared/data (each writes bench/results/<name>.json); long: run on a quiet machine.
BENCHES := convert_smollm2 ir_smollm2 sim_smollm2 nir_smollm2 lava_loihi onnx_smollm2

bench: install
	for name in $(BENCHES); do $(BIN)/python bench/$$name.py || exit 1; done
