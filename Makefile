# The two commands of the README: `make run` (the whole pipeline) and `make test`.
# Both create .venv from the lock file when it is missing or stale.
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run test lint lock bench bench-pipeline clean-venv

setup: $(INSTALLED)

$(INSTALLED): requirements.lock pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check uv==0.13.9
	# --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (as on our CI machines) Python never
	# caches .pyc, and every stage process would compile TensorFlow again (import 12.5 s -> 7 s).
	$(VENV)/bin/uv pip install --python $(PYTHON) --quiet --compile-bytecode -r requirements.lock
	$(VENV)/bin/uv pip install --python $(PYTHON) --quiet --compile-bytecode --no-deps -e .
	touch $@

run: $(INSTALLED)
	pipeline warm -- dvc repro

test: lint
	$(PYTHON) -m pytest

# Lint, format and type checks (settings in pyproject.toml); `make test` runs them first.
lint: $(INSTALLED)
	$(VENV)/bin/ruff check pipeline benchmarks
	$(VENV)/bin/ruff format --check pipeline benchmarks
	$(VENV)/bin/mypy pipeline

bench: $(INSTALLED)
	$(PYTHON) benchmarks/bench_baseline.py

# The whole run against its limit: `dvc repro -f` here, then the irreducible work alone (README).
bench-pipeline: $(INSTALLED)
	$(PYTHON) benchmarks/bench_pipeline.py

# Re-pin every dependency after a change to pyproject.toml.
lock:
	$(VENV)/bin/uv pip compile pyproject.toml --extra test --python-version 3.11 -o requirements.lock

clean-venv:
	rm -rf $(VENV)
