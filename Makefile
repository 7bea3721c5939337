# `make test` and `make demo` work on a fresh clone: they build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on these machines' disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -n 2
# timm imports torchvision, whose only wheels on these machines' disk are CUDA builds: they fail to import beside
# the CPU torch of .venv (and would break transformers' Trainer there), so timm's tests get a venv of their own,
# with a matching torch and torchvision pair (a CUDA build that runs on the CPU; about 5.5 GB, built once).
VENV_TIMM ?= .venv-timm
BIN_TIMM := $(VENV_TIMM)/bin
TIMM_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

PLUGINS := plugins/dpkit-example-layer plugins/dpkit-transformers plugins/dpkit-timm
PLUGIN_TESTS := plugins/dpkit-example-layer/tests plugins/dpkit-transformers/tests

.PHONY: test test-core test-plugins test-timm demo bench venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

test: test-core test-plugins test-timm

test-core: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

# The plugin packages install like any third-party plugin (entry points), so the tutorial cannot rot. The
# transformers plugin's test extra brings peft and accelerate (DPTrainer, LoRA). dpkit-timm installs here without
# timm (it never imports it), so that `dpkit plugins` lists it; its tests run in test-timm.
$(BIN)/.plugins: $(BIN)/.installed $(wildcard plugins/*/pyproject.toml)
	$(BIN)/pip install -q $(foreach p,$(PLUGINS),-e "$(p)$(if $(findstring transformers,$(p)),[test])")
	touch $@

test-plugins: $(BIN)/.plugins
	$(BIN)/dpkit plugins | grep -q '^example_layer '
	$(BIN)/dpkit plugins | grep -q '^transformers '
	$(BIN)/dpkit plugins | grep -q '^timm '
	$(BIN)/python -m pytest $(PYTEST_ARGS) $(PLUGIN_TESTS)

# dpkit and dpkit-timm[test] (timm) over $(TIMM_TORCH_SPEC), in $(VENV_TIMM). DPKIT_REQUIRE_TIMM=1 makes the tests
# fail, instead of skip, where timm cannot be imported.
$(BIN_TIMM)/.installed: pyproject.toml plugins/dpkit-timm/pyproject.toml
	$(PYTHON) -m venv $(VENV_TIMM)
	$(BIN_TIMM)/pip install -q $(TIMM_TORCH_SPEC)
	$(BIN_TIMM)/pip install -q -e . -e "plugins/dpkit-timm[test]" "pytest-xdist>=3"
	touch $@

test-timm: $(BIN_TIMM)/.installed
	DPKIT_REQUIRE_TIMM=1 $(BIN_TIMM)/python -m pytest $(PYTEST_ARGS) plugins/dpkit-timm/tests

demo: venv
	$(BIN)/python contrib/examples/digits.py

# Every row of the performance targets (contrib/benchmarks/RESULTS.md), on the CPU, 3 round-robin repetitions, dpkit and
# Opacus in the same run, time and peak tensor bytes; each table is saved under contrib/benchmarks/results/ (named by
# workload, replacing the last run; git keeps the history). About 16 minutes on an idle 2-core machine; Opacus is
# installed into the venv for its columns (a comparison only: dpkit never imports it).
BENCH := $(BIN)/python contrib/benchmarks/bench.py --steps 5 --warmup 2 --repeat 3 --opacus --save contrib/benchmarks/results
RESULTS := contrib/benchmarks/results
bench: venv $(BIN)/.plugins
	$(BIN)/python -c "import opacus" 2>/dev/null || $(BIN)/pip install -q --no-deps opacus
	$(BENCH) --model gpt2-cpu --batch 32 --seq 64 --threads 1 --modes auto,bk,ghost,hooks
	$(BENCH) --model gpt2-cpu --batch 32 --seq 64 --threads 2 --modes auto,bk
	$(BENCH) --model convnet-cpu --batch 64 --threads 1 --modes auto,bk,hooks
	$(BENCH) --model convnet-cpu --batch 32 --threads 1 --modes auto,bk,ghost,hooks
	$(BENCH) --model hf-gpt2 --threads 1 --modes auto --steps 3 --warmup 1
	$(BIN)/python contrib/benchmarks/bench_recurrent.py --models lstm gru mha --modes auto bk --batch 64 --seq 20 \
		--threads 2 --rounds 10 | tee $(RESULTS)/recurrent-64x20-2t.md
	$(BIN)/python contrib/benchmarks/profile_modes.py --sections overhead --modes bk,auto --steps 30 \
		| tee $(RESULTS)/host-cost.md
	$(BIN)/python contrib/benchmarks/bench_startup.py --repeat 3

clean:
	rm -rf $(VENV) $(VENV_TIMM) build *.egg-info
