# The README's two commands are `make demo` and `make test`; each installs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo test test-fast bench lint

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

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Everything but the tests marked `slow` (each over ~20 s on its own).
test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/bitplan bench all --json

lint: install
	$(BIN)/ruff check .
