# Two entry points for a fresh machine with Python >= 3.11 and pip:
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv (with the PyTorch peers) and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[peers,test]'
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	$(BIN)/python train.py --config configs/demo.py --workdir runs/demo
	$(BIN)/python evaluate.py --config configs/demo.py --checkpoint runs/demo

test: $(VENV)/.test
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

.PHONY: demo test
