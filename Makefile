# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Label Studio itself (for the end-to-end tests) lives in its own venv: its Django stack
# pins versions that must not constrain the engine's environment.
LS_VENV := .venv-ls
LS_STAMP := $(LS_VENV)/.installed
LABEL_STUDIO_VERSION := 1.23.2

# `make gpu-check` runs on a GPU machine with torch installed and no package index: no venv,
# the source tree on PYTHONPATH. Where ../shared is absent, name a copy of the fixtures:
#   make gpu-check D2_FIXTURES=.gpu-fixtures
GPU_PYTHON ?= python3
D2_FIXTURES ?= ../shared/fixtures/detectron2
GPU_REPORT ?= gpu-check.jsonl
# An earlier tree to time beside this one on the same card, e.g. `git archive` of main:
#   make gpu-check GPU_BEFORE=.gpu-before
GPU_BEFORE ?=
GPU_ARGS ?=

.PHONY: setup setup-ls demo test lint bench gpu-check clean

setup: $(STAMP)

setup-ls: $(LS_STAMP)

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/python -m pip install --quiet label-studio==$(LABEL_STUDIO_VERSION)
	touch $(LS_STAMP)

# Re-install only when the dependencies change; a second `make setup` is a no-op. The package
# declares ranges; constraints.txt pins the versions we test with.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP) $(LS_STAMP)
	$(BIN)/tridentloop demo --output demo-output

test: $(STAMP) $(LS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/tridentloop bench

# One JSON Lines report of the CUDA tests and GPU benchmarks; fails loudly without CUDA.
gpu-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m backend.bench.gpu_check \
		--fixtures $(D2_FIXTURES) --report $(GPU_REPORT) $(if $(GPU_BEFORE),--before $(GPU_BEFORE)) $(GPU_ARGS)

clean:
	rm -rf $(VENV) $(LS_VENV) demo-output .pytest_cache $(GPU_REPORT)
