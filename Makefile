# One entry point for developers and CI; .ci/run calls `make test`, as the README tells users to.
.PHONY: help bootstrap check test test-fast example-bundle demo clean

VENV := .venv
PY := $(VENV)/bin/python
export FLOORLINE_EDGE_PYTHON := $(CURDIR)/.venv-edge/bin/python
export FLOORLINE_TFLITE_PYTHON := $(CURDIR)/.venv-tflite/bin/python
export FLOORLINE_MIN_PYTHON := $(CURDIR)/.venv-min/bin/python

help:
	@echo "make demo            simulated plant + daemon + live predictions (ARGS='--duration 120')"
	@echo "make test            bootstrap, lint, type-check and run the whole suite"
	@echo "make check           ruff + mypy --strict only"
	@echo "make test-fast       the suite without the TensorFlow converter tests"
	@echo "make example-bundle  retrain the example model and rebuild its committed bundle"

bootstrap:
	@scripts/bootstrap

check: bootstrap
	$(VENV)/bin/ruff check edge converter tests scripts
	scripts/typecheck

test: check
	$(PY) -m pytest

test-fast: bootstrap
	$(PY) -m pytest -m "not tensorflow"

demo:
	@scripts/bootstrap edge
	.venv-edge/bin/floorline demo $(ARGS)

example-bundle: bootstrap
	$(PY) -m floorline.converter.examples.pdm --out edge/models/pdm-classifier

clean:
	rm -rf .venv .venv-edge .venv-tflite .venv-min .mypy_cache .ruff_cache .pytest_cache build *.egg-info
