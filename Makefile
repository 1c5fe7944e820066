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

# The doctests run in a fresh process after the tests, so that they start with few memory
# mappings (see tests/conftest.py: a long-lived worker can run out of them).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests
	$(BIN)/python -m pytest -q -n 2 jsample --doctest-modules

bench: $(STAMP)
	$(BIN)/python -m jsample bench

clean:
	rm -rf $(VENV)
