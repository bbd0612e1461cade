# The two set-up commands: `make run` and `make test`. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: run test lint format clean bench

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

run: $(BIN)/.installed
	$(BIN)/uvicorn app.main:app --host 127.0.0.1 --port $(PORT)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

# Performance table (docs/PERFORMANCE.md): PostgreSQL on 127.0.0.1:5432 and wrk (installed
# through apt when missing and root). BENCH_ARGS="--markdown", BENCH_APP_ENV="NAME=VALUE ...".
bench: $(BIN)/.installed
	@$(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache consensus_engine.db*
