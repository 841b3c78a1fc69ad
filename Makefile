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

# What the GPU image lacks (fastapi/uvicorn for gpu-check's serve section, pycocotools for
# its selection benchmark): `make gpu-wheels` fetches them here, at the versions we pin, for
# the device call to carry (`.whl` in `carry`); `make gpu-check` installs them when present.
GPU_WHEELS := fastapi starlette pydantic pydantic_core annotated-types typing-inspection \
	uvicorn pycocotools
GPU_SITE ?= /tmp/tridentloop-gpu-site

.PHONY: setup setup-ls demo test lint bench gpu-check gpu-wheels clean

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
gpu-wheels:
	mkdir -p .whl
	for name in $(GPU_WHEELS); do \
		pin=$$(grep -i "^$$name==" constraints.txt) || { echo "$$name is not pinned"; exit 1; }; \
		$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
			--implementation cp --platform manylinux_2_28_x86_64 \
			--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$$pin" \
			|| exit 1; \
	done

gpu-check:
	if [ -d .whl ]; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=.:$(GPU_SITE) PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m backend.bench.gpu_check \
		--fixtures $(D2_FIXTURES) --report $(GPU_REPORT) $(if $(GPU_BEFORE),--before $(GPU_BEFORE)) $(GPU_ARGS)

clean:
	rm -rf $(VENV) $(LS_VENV) demo-output .pytest_cache $(GPU_REPORT)
