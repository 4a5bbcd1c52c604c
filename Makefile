# Two entry points (see README): `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench-serve clean

# torch first, alone and pinned, so the resolver never reaches for a CUDA build;
# then everything else under constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/flywheel demo --report .flywheel/demo-report

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/pytest

bench-serve: install
	$(BIN)/python -m bench serve

clean:
	rm -rf $(VENV) .flywheel .pytest_cache .ruff_cache *.egg-info
