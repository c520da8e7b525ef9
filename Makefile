# cxrkit developer entry points. `make demo` and `make test` are the README's two set-up commands.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cxrkit-installed

.PHONY: demo test lint bench

# Everything (all extras + dev tools) at the exact versions CI tests (constraints.txt); a plain
# `pip install cxrkit` gets the core only (see the README's Installation section).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[all,dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cxr demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -n auto --maxprocesses=4 $(ARGS)

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do $(PY) $$b; done
