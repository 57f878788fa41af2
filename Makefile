# Conveyor: `make pipeline` runs the default pipeline, `make test` runs the test suite.
# Both set the environment up on first use.
SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
CONVEYOR := $(VENV)/bin/conveyor
SPEC ?= pipelines/mnist.yaml
PYTEST_ARGS ?=
# More `conveyor serve` flags for `make serve`, e.g. SERVE_FLAGS=--server_processes=2 (one process per core).
SERVE_FLAGS ?=
# Test processes (pytest-xdist). Each test file runs whole on one worker, so its servers and fixtures are
# started once; the session's pipeline runs are built once and shared (tests/e2e/conftest.py).
TEST_WORKERS ?= 2
# The container `make image` builds: set kubeflow.image and --sdk_container_image to it (README: Data at scale).
VERSION := $(shell sed -n 's/.*version="\([^"]*\)".*/\1/p' setup.py)
IMAGE ?= conveyor:$(VERSION)

# Keras 3 cannot write the SavedModel TFX 1.16 needs; this must be set before TensorFlow loads.
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 3
export PYTHONUNBUFFERED := 1

.PHONY: setup pipeline test test-fast serve lineage schedule bench bench-scale lint reference image clean lock

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py scripts/setup_venv.sh
	@scripts/setup_venv.sh

pipeline: setup
	$(CONVEYOR) run $(SPEC)

test: setup
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

serve: setup
	$(CONVEYOR) serve --spec $(SPEC) $(SERVE_FLAGS)

lineage: setup
	$(CONVEYOR) lineage --spec $(SPEC) --format html -o workspace/lineage.html

schedule: setup
	$(CONVEYOR) schedule $(SPEC) --on-new-data --every 30m

bench: setup
	@scripts/install_bench_tools.sh
	PYTHONWARNINGS=ignore::FutureWarning $(PYTHON) -m benchmarks.run_all

# Only the scale benchmark (10k, 100k and 1M examples; long).
bench-scale: setup
	PYTHONWARNINGS=ignore::FutureWarning $(PYTHON) -m benchmarks.run_all --only scale

# The image Kubeflow / Vertex AI steps and Dataflow workers run, from the same lock (needs a Docker engine).
image:
	docker build -t $(IMAGE) .
	@echo "conveyor: built $(IMAGE); push it with: docker push $(IMAGE)"

# ruff (style, unused code, stale noqa), then the layering and import-cycle checks ruff does not have.
lint: setup
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/unit/test_architecture.py

# What is generated from the code: the spec's JSON Schema and the README's option table (from the spec model),
# and the README's JSON output reference (from the command records).
reference: setup
	$(PYTHON) -m conveyor_ml.base.spec_reference
	$(PYTHON) -m conveyor_ml.operations.json_reference

# Re-resolves the lock from requirements.in in a scratch venv (needs the package registry).
lock:
	rm -rf /tmp/conveyor-lock && $$(scripts/setup_venv.sh --print-python) -m venv /tmp/conveyor-lock
	/tmp/conveyor-lock/bin/pip install -q -r requirements.in
	/tmp/conveyor-lock/bin/pip freeze | grep -v '^-e' > requirements.txt

clean:
	rm -rf workspace
