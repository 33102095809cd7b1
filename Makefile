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

.PHONY: setup check browser demo test test-fast clean

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
	$(BIN)/pyright --pythonpath $(abspath $(BIN)/python)
	$(BIN)/lint-imports

# The report's browser tests drive Debian's chromium (Playwright's own browser downloads are not used): installed
# with apt when missing (root, as in CI; without the recommended packages: 11 s here, apt-get update included);
# elsewhere the tests skip, saying why (under CI=true they fail).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the report's browser tests (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else \
		echo "no chromium and no root to install it: the report's browser tests will skip (apt-get install chromium)"; \
	fi

test: check browser
	$(BIN)/python -m pytest

test-fast: check browser
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
