# Everything a fresh machine needs: `make demo` and `make test` build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jsample demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests jsample --doctest-modules

bench: $(STAMP)
	$(BIN)/python -m jsample bench

clean:
	rm -rf $(VENV)
