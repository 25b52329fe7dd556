# Every target creates the virtual environment when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: demo test check-slow bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.installed: $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m p2pdeploy.demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

check-slow: $(VENV)/.installed-test
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -m slow

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/bench_scenarios.py --engine
	$(PY) benchmarks/bench_overlay.py
	$(PY) benchmarks/bench_contact_flood.py
	$(PY) benchmarks/bench_self_healing.py

clean:
	rm -rf $(VENV) build *.egg-info
