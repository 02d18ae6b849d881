# make install: .venv with everything (editable install of the top-level packages).
# make test:    install when needed, then ruff and the test suite on TEST_WORKERS pytest-xdist workers (each worker's
#               launcher tests share one Ray cluster of its own, with its share of the cores; worksteal keeps them
#               busy to the end), its 15 slowest tests listed at the end. On 2 cores a third worker fills the time two
#               spend waiting on Ray: 555 s on 3 workers, 594 s on 2 (same commit, back to back, 2026-12-07).
# make test-fast: the tests that start no Ray and are not marked slow, on every core (the edit-run loop).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_WORKERS ?= 3

.PHONY: install test test-fast lint demo docs clean

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
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal --durations=15

test-fast: lint
	$(PY) -m pytest -m 'not ray and not slow' -n auto --durations=15

# The demo study (sweeps/studies/demo.yaml: GPT-2 124M head-only on SMS spam, 160 vs 32 training examples and an
# A/A control, four seeds; random-init with a loud warning when offline) on this machine with an embedded Ray, a
# short table of results, then the guide (its path is the last line printed). Its 300-example test set resolves
# differences of ~15 points and no less, so "equivalent" means within ±3 points (the design: demo.yaml's header).
DEMO_DB ?= results/demo.duckdb
DEMO_GUIDE ?= reports/demo
demo: install
	$(PY) sweeps/launch.py grid --study demo --db $(DEMO_DB)
	$(PY) sweeps/launch.py summary --db $(DEMO_DB)
	$(PY) analysis/build_guide.py --db $(DEMO_DB) --out $(DEMO_GUIDE) --margin accuracy=0.03

# The documentation site (docs/, mkdocs.yml) into site/. --strict: a warning (a broken link or anchor, a page left
# out of the nav, a command whose --help fails while docs/hooks/cli_reference.py generates docs/cli.md) fails it.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache test-artifacts
