# Everyday tasks. `make run` and `make test` install what they need on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
TORCH_VERSION := 2.13.0
# Label Studio lives in its own environment: the end-to-end tests and `make demo` start it.
LS_VENV ?= .venv-ls
LABEL_STUDIO_VERSION := 1.23.2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install install-label-studio run demo screenshot dashboard-screenshot test test-fast lint format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a later unpinned requirement would otherwise pull CUDA wheels.
	# uv resolves the rest in seconds where pip backtracks for many minutes.
	$(PY) -m pip install -q torch==$(TORCH_VERSION) uv
	$(UV) pip install -q --python $(PY) -e ".[dev]"
	touch $@

$(LS_VENV)/.installed: $(VENV)/.installed
	$(UV) venv -q --python $(PYTHON) $(LS_VENV)
	$(UV) pip install -q --python $(LS_VENV)/bin/python label-studio==$(LABEL_STUDIO_VERSION)
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/rlhf-backend serve

install-label-studio: $(LS_VENV)/.installed

test: install install-label-studio
	LABEL_STUDIO_BIN=$(abspath $(LS_VENV))/bin/label-studio $(PY) -m pytest

demo: install install-label-studio
	$(PY) scripts/demo.py --label-studio $(abspath $(LS_VENV))/bin/label-studio

# The README's picture of the labeling screen: the demo, then headless Chromium (Debian's).
screenshot: install install-label-studio
	command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -q chromium chromium-driver
	$(UV) pip install -q --python $(PY) -e ".[dev,screenshot]"
	$(PY) scripts/demo.py --label-studio $(abspath $(LS_VENV))/bin/label-studio \
		--no-wait --screenshot docs/labeling-screen.png --screenshot-task 1

# The README's picture of the dashboard: the browser test's project, as headless Chromium drew it.
dashboard-screenshot: install
	command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -q chromium chromium-driver
	RLHF_DASHBOARD_SCREENSHOT=$(abspath docs/dashboard.png) $(PY) -m pytest -q \
		tests/test_dashboard.py -k browser

test-fast: install
	$(PY) -m pytest -m "not e2e and not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) bench/webhook_latency.py

clean:
	rm -rf $(VENV) .venv-ls .pytest_cache .ruff_cache .mypy_cache
