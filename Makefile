# The README's commands live here. Everything runs inside a project virtualenv (.venv) so a fresh
# machine needs only python3 (with venv), a C compiler and the Python headers.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test install bench soak wheel clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Editable install: builds the Cython extensions in place (rebuilt when a .pyx changes).
install: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'

run: install
	$(BIN)/fastgw run

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-only
	$(BIN)/python benchmarks/e2e.py

# 1 GiB up and down through the proxy with a slow peer; prints the resident memory growth.
soak: install
	FASTGW_STREAM_MIB=1024 $(BIN)/python -m pytest tests/test_streaming.py -k rss -v -s

wheel: $(BIN)/python
	$(BIN)/python -m pip install -q build
	$(BIN)/python -m build

clean:
	rm -rf build dist *.egg-info fastgw/_core/*.c fastgw/_core/*.so fastgw/_core/*.html
