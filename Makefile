# The two commands of the README: `make run` and `make test`. Each sets up its own virtualenv (.venv) first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml setup.py keepstore/_md5mb.c keepstore/_fileio.c keepstore/_reqparse.c | md5sum | cut -c1-12)

.PHONY: run test lint unit venv clean bench

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml setup.py keepstore/_md5mb.c keepstore/_fileio.c keepstore/_reqparse.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	$(BIN)/pip check
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

## make run: start keepstore on the embedded default (./keep-data, 127.0.0.1:25107), or on CONFIG=path.yml
run: $(STAMP)
	$(BIN)/keepstore $(if $(CONFIG),--config $(CONFIG),)

## make test: lint, type-check and run every test (unit, contract, functional, system)
test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check keepstore tests bench scripts
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit tests/contract $(PYTEST_ARGS)

## make bench: keepstore vs nginx on the same work (installs nginx and wrk from Debian if missing; needs root)
bench: $(STAMP)
	$(BIN)/python bench/http_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
