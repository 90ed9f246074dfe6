# EMDC developer entry points. Everything runs inside ./.venv, created on demand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: help simulate test test-fast test-ha bench docs lint install-edge uninstall-edge clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

simulate: $(STAMP) ## Simulate an hour of household load end to end (embedded broker unless EMDC_AMQP_URL/EMDC_MQTT_HOST are set)
	$(BIN)/emdc simulate $(ARGS)

test: $(STAMP) ## Run the whole test suite against the real brokers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## The tests that need no broker or database (a quick inner loop)
	$(BIN)/python -m pytest -m "not brokers" $(PYTEST_ARGS)

test-ha: $(STAMP) ## EMDC in a real Home Assistant Core (as root; the first run builds it into /var/cache/emdc-ha)
	$(BIN)/python -m pytest -m ha_core $(PYTEST_ARGS)

bench: $(STAMP) ## Measure throughput and latency against the real brokers; writes bench-results.json
	$(BIN)/python -m bench $(ARGS)

docs: $(STAMP) ## Build the documentation site (strict)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

lint: $(STAMP) ## ruff, and mypy --strict over the packages
	$(BIN)/ruff check .
	$(BIN)/mypy

install-edge: ## On the Pi, as root: install the edge service (idempotent)
	sudo deploy/edge/install-edge.sh install

uninstall-edge: ## On the Pi, as root: remove the edge service (keeps /var/lib/emdc unless PURGE=1)
	sudo PURGE=$(PURGE) deploy/edge/install-edge.sh uninstall

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
