# One command to run the whole stack locally, one to run the tests. See README.md.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU wheel for dev/CI; GPU nodes install the CUDA build instead (docs/deploy.md).
TORCH  ?= torch==2.13.0
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: up test lint install redis-server chromium clean

## up: install everything, then start Redis, Ray, the API, a dispatcher and the tiny model (Ctrl-C stops all)
up: install redis-server
	$(BIN)/lorafleet up

## test: install everything, then lint and run the whole test suite (slow end-to-end tests included)
test: install redis-server chromium lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=30

lint: install
	$(BIN)/ruff check .

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server; }

# The dashboard's browser tests drive Debian's chromium through playwright (never `playwright install`).
chromium:
	@command -v chromium >/dev/null || { \
	  echo "installing chromium with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
