# `make demo` and `make test` do all set-up on a fresh machine: a .venv, torch 2.13.0
# (the CPU build, a local file on the team's machines), then this package and what the
# target needs, pinned by constraints.txt. Stamp files keep later runs from reinstalling.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test test-all lint format bench fuzz clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.torch: $(VENV)/.created
	$(PIP) install -q torch==2.13.0
	touch $@

$(VENV)/.hf: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[hf]"
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@ $(VENV)/.hf

demo: $(VENV)/.hf
	$(VENV)/bin/xyserve demo

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

# Includes the tests marked slow.
test-all: lint
	$(PY) -m pytest -m ""

format: $(VENV)/.test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.hf
	$(PY) benchmarks/hf_generate.py

# Differential fuzzer of the lowering: N random programs compiled with xyserve vs eager
# (xy_inductor/fuzz.py). Prints cases, lowered, left alone by reason, and wrong (must be 0).
N ?= 1000
SEED ?= 0
fuzz: $(VENV)/.test
	$(PY) -m xy_inductor.fuzz --cases $(N) --seed $(SEED)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
