# make install: .venv with everything (editable install of the top-level packages).
# make test:    install when needed, then ruff and the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

# The demo study (gpt2 124M on an SMS spam subset, six methods and an A/A control; random-init with a loud warning
# when offline) on this machine with an embedded Ray, a short table of results, then the guide (its path is the last
# line printed). Its 300-example test set cannot resolve a 1-point difference, so "equivalent" means within ±3 points.
DEMO_DB ?= results/demo.duckdb
DEMO_GUIDE ?= reports/demo
demo: install
	$(PY) sweeps/launch.py grid --study demo --db $(DEMO_DB)
	$(PY) sweeps/launch.py summary --db $(DEMO_DB)
	$(PY) analysis/build_guide.py --db $(DEMO_DB) --out $(DEMO_GUIDE) --margin accuracy=0.03

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache test-artifacts
