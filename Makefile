# poolfleet developer commands. Every target creates .venv itself when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench bench-peers cluster clean unit format

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=strict -e '.[dev]'
	touch $(STAMP)

## make test: install into .venv with the test extras and run the whole suite
test: $(STAMP)
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

## make lint: ruff (lint + format check) and mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## make demo: a master and two workers on loopback, a mixed batch of cpu, io and cmd tasks
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python deploy/demo.py

## make bench: the benchmark table, also written to docs/BENCHMARKS.md
bench: $(STAMP)
	$(BIN)/python -m bench

## make bench-peers: the same workloads through Ray, Dask distributed, Celery + Redis and RQ
## beside poolfleet and the local pool, in one table in docs/BENCHMARKS.md. The peers live in
## their own environment, $(PEERS_VENV) (never in .venv); Celery and RQ need redis-server on PATH
## (Debian: apt-get install redis-server) and are left out without it.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
$(PEERS_STAMP): bench/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -r bench/peers/requirements.txt
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	@command -v redis-server >/dev/null || echo "bench-peers: no redis-server on PATH: apt-get install redis-server (Celery and RQ are skipped)"
	$(BIN)/python -m bench.peers --python $(PEERS_VENV)/bin/python $(PEERS_ARGS)

## make cluster: build the image (deploy/docker/build.sh, no registry needed) and start a
## master, two workers and a client that checks a batch, with docker-compose. Ctrl-C stops it;
## remove it with: $(COMPOSE) -p poolfleet -f deploy/docker-compose.yml down -v
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
cluster: $(STAMP)
	PYTHON="$(CURDIR)/$(BIN)/python" deploy/docker/build.sh
	$(COMPOSE) --project-name poolfleet --file deploy/docker-compose.yml up

clean:
	rm -rf $(VENV) $(PEERS_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
