# The two commands: `make run` (the local mini-pipeline on the built-in digits data) and `make test`.
# Both install kdflow and its pinned dependencies into the current Python first (once per pyproject change).
PYTHON ?= python3
STAMP := .setup.stamp
ARGS ?=

.PHONY: setup run test test-fast compile lint image push tracking-up tracking-down

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $@

run: $(STAMP)
	$(PYTHON) -m kdflow.cli run $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest

test-fast: $(STAMP)  # everything but the end-to-end runs, real server stacks and torchrun workers
	$(PYTHON) -m pytest -m "not slow"

compile: $(STAMP)
	$(PYTHON) -m kdflow.cli compile $(ARGS)

lint: $(STAMP)
	$(PYTHON) -m ruff check src components pipelines tests

# Cluster path: the image every step runs in (tag from kdflow.components.image) and the MLflow tracking stack
IMAGE = $(shell $(PYTHON) -c 'from kdflow.components.image import IMAGE; print(IMAGE)')
COMPOSE = docker compose -f docker/compose.yaml --env-file docker/.env

image: $(STAMP)
	docker build -f docker/Dockerfile -t $(IMAGE) .

push: image
	docker push $(IMAGE)

tracking-up:
	$(COMPOSE) up -d --build

tracking-down:
	$(COMPOSE) down
