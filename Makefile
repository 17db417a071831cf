# `make demo`: train the built-in demo and write a sample grid. `make test`: run the test suite.
# Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Test-only packages: wandb (optional, not in requirements.txt; train.py --wandb) so that the W&B test runs
# offline (WANDB_MODE=offline) instead of being skipped.
TEST_PACKAGES := "pytest>=8" "wandb>=0.19,<1"

.PHONY: demo test

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt $(TEST_PACKAGES)
	touch $@

demo: $(VENV)/installed
	$(PY) train.py

test: $(VENV)/installed
	$(PY) -m pytest -q --durations=10 tests
