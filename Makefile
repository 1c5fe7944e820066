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

# The doctests run in a fresh process after the tests: the five worker aborts seen so far (XLA
# native code, see tests/conftest.py) all hit a doctest late in a long-lived xdist worker.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests
	$(BIN)/python -m pytest -q -n 2 jsample --doctest-modules

bench: $(STAMP)
	$(BIN)/python -m jsample bench

clean:
	rm -rf $(VENV)
