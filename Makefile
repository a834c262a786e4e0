# `make demo` and `make test` build their own environment in .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out

.PHONY: demo test env clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dali,test]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/clipreel demo --out $(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=25

clean-demo:
	rm -rf $(DEMO)
