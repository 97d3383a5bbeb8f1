# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both bootstrap .venv with the pinned CPU stack (torch==2.13.0, see requirements-cpu.txt).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MTEB_CACHE := $(CURDIR)/.cache/mteb
export PYTHONHASHSEED := 0

.PHONY: demo test test-fast bench venv browser clean strip-notebooks

$(STAMP): requirements-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	set -o pipefail; $(BIN)/pip install -q --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; }
	set -o pipefail; $(BIN)/pip install -q -r requirements-cpu.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
	set -o pipefail; $(BIN)/pip install -q --no-deps -e . 2>&1 | { grep -v -e '^WARNING: Location' -e 'wheel_obj' -e '!!' || true; }
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

# Headless Chromium for the report test (Debian package); skipped visibly by the test if it cannot be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1) || echo "note: chromium could not be installed; browser tests will be skipped"

demo: $(STAMP)
	$(BIN)/kalm pipeline --preset cpu-demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser" tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

strip-notebooks: $(STAMP)
	$(BIN)/nbstripout notebooks/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache .cache test-artifacts
