# Two entry points (see README): `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow lint typecheck browser bench-serve clean

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

# The lint step of `make test` (and so of CI): any finding fails it.
lint: install typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy over the package as it installs (flywheel.service is service/, ...): a tree of
# links in .typecheck/ gives mypy that layout. tests/typing/must_refuse.py holds what it
# must refuse (the wrong settings group, a str for a model version).
TYPECHECK := .typecheck
typecheck: install
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/flywheel
	for f in flywheel/*; do ln -s ../../$$f $(TYPECHECK)/flywheel/; done
	for c in service feedback learner privacy kernels migrations; do \
	  ln -s ../../$$c $(TYPECHECK)/flywheel/$$c; done
	ln -s ../tests/typing/must_refuse.py $(TYPECHECK)/must_refuse.py
	cd $(TYPECHECK) && ../$(BIN)/mypy --config-file ../pyproject.toml \
	  --cache-dir ../.mypy_cache -p flywheel -m must_refuse

# Debian's Chromium for the review page's browser test (tests/integration/test_review_ui.py);
# Playwright drives it and never downloads a browser. If it cannot be installed (not root, no
# apt), say so and go on: that test then fails under CI=true and skips otherwise.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	} || echo "warning: could not install chromium (apt-get install -y chromium)" >&2

# `make test`: lint, then every test not marked slow, in parallel (pytest-xdist): one worker
# per core (TEST_WORKERS=1 for one process), each worker with its own PostgreSQL database,
# broker, ports and tmp homes; a file's tests stay on one worker (--dist loadfile), so a
# module's expensive fixture is made once. `make test-slow`: the tests marked slow (federated
# attack matrix, fault suites, long fuzzing, benchmark smokes); .ci/run runs both.
TEST_WORKERS ?= auto
PYTEST_PARALLEL = $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

test: install lint browser
	$(PYTEST_PARALLEL) -m "not slow"

test-slow: install browser
	$(PYTEST_PARALLEL) -m slow

bench-serve: install
	$(BIN)/python -m bench serve

clean:
	rm -rf $(VENV) .flywheel .pytest_cache .ruff_cache .mypy_cache .typecheck *.egg-info
