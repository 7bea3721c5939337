# `make test` and `make demo` work on a fresh clone: they build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on these machines' disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

PLUGINS := plugins/dpkit-example-layer plugins/dpkit-transformers plugins/dpkit-timm

.PHONY: test test-core test-plugins demo bench venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

test: test-core test-plugins

test-core: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

# The plugin packages install like any third-party plugin (entry points), so the tutorial cannot rot. The
# transformers plugin's test extra brings peft and accelerate (DPTrainer, LoRA); timm's would bring a CUDA
# torchvision over the CPU torch, so its tests skip unless timm is installed by hand.
$(BIN)/.plugins: $(BIN)/.installed $(wildcard plugins/*/pyproject.toml)
	$(BIN)/pip install -q $(foreach p,$(PLUGINS),-e "$(p)$(if $(findstring transformers,$(p)),[test])")
	touch $@

test-plugins: $(BIN)/.plugins
	$(BIN)/dpkit plugins | grep -q '^example_layer '
	$(BIN)/dpkit plugins | grep -q '^transformers '
	$(BIN)/dpkit plugins | grep -q '^timm '
	$(BIN)/python -m pytest $(PYTEST_ARGS) $(foreach p,$(PLUGINS),$(p)/tests)

demo: venv
	$(BIN)/python contrib/examples/digits.py

# A quick CPU table (about 2 minutes): the GPT-style model and the convnet, non-private and in dpkit's main modes
# (Opacus as a column when installed), saved as one file per run under contrib/benchmarks/results/.
bench: venv
	$(BIN)/python contrib/benchmarks/bench.py --model cpu-small --steps 5 --warmup 2 --threads 1 \
		--modes auto,bk,ghost,hooks --opacus | tee contrib/benchmarks/results/bench-cpu-small-$$(git rev-parse --short HEAD).md

clean:
	rm -rf $(VENV) build *.egg-info
