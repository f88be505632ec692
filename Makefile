# cmcd: `make run` starts a development daemon under ./var; `make test` runs the whole suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= etc/cmcd.dev.toml

.PHONY: run test lint bench fuzz clean venv

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

var/tls/cert.pem: | $(VENV)/.installed
	mkdir -p var/tls
	$(BIN)/python -m cmcd.devcert var/tls

run: venv var/tls/cert.pem
	mkdir -p var/spool var/backups var/outbox
	$(BIN)/python -m cmcd.devsink --listen 127.0.0.1:2526 --dir var/outbox & devsink=$$!; \
	trap 'kill $$devsink 2>/dev/null; wait $$devsink' EXIT; \
	$(BIN)/cmcd serve --config $(CONFIG) & daemon=$$!; trap 'kill $$daemon 2>/dev/null' INT TERM; \
	wait $$daemon; rc=$$?; while kill -0 $$daemon 2>/dev/null; do wait $$daemon; rc=$$?; done; exit $$rc

lint: venv
	$(BIN)/ruff check cmcd tests bench
	$(BIN)/ruff format --check cmcd tests bench
	$(BIN)/mypy cmcd

test: venv lint
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

fuzz: venv
	CMCD_FUZZ_EXAMPLES=500 CMCD_FUZZ_RANDOM=1 $(BIN)/pytest -q -p no:cacheprovider tests/fuzz

bench: venv
	$(BIN)/python bench/intake.py

clean:
	rm -rf $(VENV) var
