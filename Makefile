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
	$(BIN)/pip install -q -e '.[peers,test,serve,tpu]'
	touch $@ $(VENV)/.core

# tests/test_serve.py drives Debian's chromium through its chromedriver (no browser download at run
# time): installed here when missing (as root, or with sudo); fails loudly when it cannot be.
chromium:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	command -v apt-get >/dev/null || { echo "make chromium: no apt-get; install chromium and chromedriver at /usr/bin" >&2; exit 1; }; \
	$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver \
	  || { echo "make chromium: could not install Debian's chromium + chromium-driver (needed by tests/test_serve.py)" >&2; exit 1; }; \
	[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { echo "make chromium: /usr/bin/chromium or /usr/bin/chromedriver still missing" >&2; exit 1; }

demo: $(VENV)/.core
	$(BIN)/python train.py --config configs/demo.py --workdir runs/demo
	$(BIN)/python evaluate.py --config configs/demo.py --checkpoint runs/demo

test: $(VENV)/.test chromium
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=30 tests

.PHONY: demo test chromium
