# `make demo`: train the built-in demo and write a sample grid. `make test`: run the test suite.
# Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt "pytest>=8"
	touch $@

demo: $(VENV)/installed
	$(PY) train.py

test: $(VENV)/installed
	$(PY) -m pytest -q tests
