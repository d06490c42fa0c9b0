# tickscore: two entry points.
#   make demo  - set up .venv and replay the embedded data through the default int8 model
#   make test  - set up .venv and run the test suite
# Python 3.12 is required (pyaeron ships 3.12+ wheels); .python-version pins it under pyenv.

PY := $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LOCK := .ci/constraints.txt

.PHONY: demo test venv lint bench clean lock

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 12), f"tickscore needs Python >= 3.12, $(PY) is {sys.version.split()[0]}"'
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev]'
	@touch $(STAMP)

# Refresh the lock (every transitive version) from the newest releases allowed by pyproject.toml.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -e '.[dev]'
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^tickscore' > $(LOCK)
	rm -rf .venv-lock

demo: $(STAMP)
	$(BIN)/tickscore replay --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_replay.py --json benchmarks/results/replay.json

clean:
	rm -rf runs .pytest_cache
