# Two entry points (see README): `make demo` runs the main job on the embedded model,
# `make test` runs the test suite. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Offline copy of FLORES/MBPP beside the checkout, when there is one (CI and dev machines).
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
export ICL_LOCATE_DATA_DIR ?= $(SHARED_DATA)
endif

.PHONY: setup check demo test test-fast clean

setup: $(VENV)/.installed

# torch first: keep a torch the system already has (GPU users), else the pinned CPU/default wheel.
$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,ray]'
	touch $@

demo: setup
	$(BIN)/icl-locate demo

# The checks a reviewer would otherwise do by hand, before any test runs: format, lint, types, layers.
check: setup
	$(BIN)/ruff format --check src tests
	$(BIN)/ruff check src tests
	$(BIN)/pyright
	$(BIN)/lint-imports

test: check
	$(BIN)/python -m pytest

test-fast: check
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
