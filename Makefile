# Every target is idempotent: `make setup` only does work that is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.rmae-installed

# torch and torchvision must be a matching pair (timm imports torchvision).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# Debian's chromium drives the dashboard's real-browser test (Playwright cannot download one here).
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet $(TORCH_PINS) -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rmae demo

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) benchmarks/bench_models.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_analysis.py
	$(PY) benchmarks/bench_probes.py
	$(PY) benchmarks/bench_study.py
	test ! -f benchmarks/bench_dashboard.py || $(PY) benchmarks/bench_dashboard.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
