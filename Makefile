# clickpulse — every target is listed by `make help` (the default).
.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
JARS_DIR := .clickpulse/jars
POM := connectors/maven/pom.xml
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: help venv sysdeps jars demo test test-unit chaos lint docs vendor stack-up stack-down stack-status bench clean

help: ## list every target
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[local,dev]'
	@touch $@

venv: $(VENV)/.installed ## create .venv and install clickpulse with dev tools (idempotent)

sysdeps: ## install redis-server, a Java 17 JDK, maven and chromium (browser test) with apt when missing (needs root)
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v javac >/dev/null || missing="$$missing openjdk-17-jdk-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "error: missing$$missing — install with: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi

$(JARS_DIR)/.resolved: $(POM) connectors/jvm/pom.xml $(shell find connectors/jvm/src -name '*.java') | sysdeps
	mvn -q -B -f $(POM) package -Djars.dir=$(abspath $(JARS_DIR))
	@touch $@

jars: $(JARS_DIR)/.resolved ## resolve the pinned Kafka broker and Flink connector jars and build the JVM operators with Maven (no-op when done)

demo: venv sysdeps jars ## run the demo on the embedded stack, then serve its dashboard until Ctrl-C (DEMO_ARGS=--exit: end after the summary)
	$(BIN)/clickpulse demo $(DEMO_ARGS)

test: venv sysdeps jars ## run every test tier (unit, job, integration)
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: venv ## run only the unit tier (no JVM, no services)
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

chaos: venv sysdeps jars ## every fault test plus the chaos scenario; refreshes README's faults table
	status=0; $(BIN)/pytest -m fault $(PYTEST_ARGS) || status=$$?; \
	$(BIN)/python -m devstack.faultreport --write || true; \
	exit $$status

lint: venv ## ruff, mypy and the README configuration reference check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m devstack.configdoc --check

docs: venv ## regenerate README's configuration reference from the settings classes
	$(BIN)/python -m devstack.configdoc --write

vendor: ## refresh the dashboard's vendored uPlot (pinned in connectors/dashboard/static/vendor/VERSIONS; needs npm)
	devstack/vendor.sh $(UPLOT_VERSION)

stack-up: venv sysdeps jars ## start the local stack (Kafka, Redis, ClickHouse endpoint)
	$(BIN)/clickpulse stack up

stack-down: venv ## stop what stack-up started
	$(BIN)/clickpulse stack down

stack-status: venv ## health of the local stack
	$(BIN)/clickpulse stack status

bench: venv sysdeps jars ## run the benchmarks and write bench/RESULTS.md
	$(BIN)/python -m bench

clean: ## remove the venv and local stack data (stop the stack first)
	rm -rf $(VENV) .clickpulse
