# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo demo-video test test-all lint
install:
	@bash scripts/setup.sh

demo: install
	$(PY) -m sambridge demo

# after `make demo`: track and count its concepts in generated moving-shapes clips (docs/video.md)
demo-video: install
	$(PY) -m sambridge demo-video

# one pytest worker per core (at most 4), each test file on one worker (its module fixtures built once)
test: install
	$(PY) -m pytest -q -n logical --maxprocesses 4 --dist loadfile

test-all: install
	$(PY) -m pytest -q -m "not gpu"

# ruff, then the layering contracts of pyproject.toml (docs/architecture.md); `make test` checks them too
lint: install
	$(VENV)/bin/ruff check sambridge data_pipelines scripts tests train.py
	$(VENV)/bin/lint-imports
