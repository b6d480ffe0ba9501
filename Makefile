# `make demo`: set up (virtualenv, torch, megalite) and run the main job.
# `make test`: set up and run the test suite (everything; CI and the README run this).
# `make test-fast`: single-process and layer-level tests plus one small 2-rank world, a few
#   minutes on 2 cores: no `slow`, `world` (process worlds; tests/conftest.py marks them) or
#   `cluster` tests.
# An active virtualenv ($VIRTUAL_ENV) is used as is; otherwise .venv is created here.
PYTHON ?= python3
VENV ?= .venv
ifdef VIRTUAL_ENV
BIN := $(VIRTUAL_ENV)/bin
else
BIN := $(CURDIR)/$(VENV)/bin
endif
STAMP := $(BIN)/.megalite-installed
DEMO_ARGS ?=
TEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/* csrc/*/*)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch 2.13.0 (CPU) when no torch is importable; never let pip pick a CUDA build by itself
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/megalite train --config configs/demo.yaml $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q --durations=20 $(TEST_ARGS) tests

test-fast: setup
	$(BIN)/python -m pytest -q --durations=10 -m "not slow and not world and not cluster" \
		$(TEST_ARGS) tests

bench: setup
	$(BIN)/python bench/overhead.py

clean:
	rm -rf runs .cache
