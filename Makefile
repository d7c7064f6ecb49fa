# The two commands: `make run` (the local mini-pipeline on the built-in digits data) and `make test`.
# Both install kdflow and its pinned dependencies into the current Python first (once per pyproject change).
PYTHON ?= python3
STAMP := .setup.stamp
ARGS ?=

.PHONY: setup run test compile lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $@

run: $(STAMP)
	$(PYTHON) -m kdflow.cli run $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest

compile: $(STAMP)
	$(PYTHON) -m kdflow.cli compile $(ARGS)

lint: $(STAMP)
	$(PYTHON) -m ruff check src components pipelines tests
