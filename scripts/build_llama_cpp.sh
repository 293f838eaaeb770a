#!/usr/bin/env bash
# Build llama.cpp's tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench) from
# the llama.cpp source tree that ships inside the llama-cpp-python source distribution on PyPI
# (the only registry this machine reaches), with the cmake, ninja and g++ already installed.
# Cached outside the clone, so a machine builds once: $XDG_CACHE_HOME/bitplan/llama.cpp/<version>.
# Prints the directory holding the binaries on its last line. Usage: build_llama_cpp.sh [PIP]
# [--source]: with --source, only fetch and unpack the source (the converter target gguf runs)
# and print its directory.
set -euo pipefail

VERSION=0.3.36                       # llama-cpp-python; its vendor/llama.cpp is the source
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-bench)
PIP=${1:-pip}
ONLY_SOURCE=${2:-}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/bitplan/llama.cpp/$VERSION
BIN=$CACHE/build/bin

STAMP=$CACHE/build/.bitplan-log-drain    # built with the log patch below
have_all() { for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; [ -f "$STAMP" ]; }

src=$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp
if [ "$ONLY_SOURCE" != "--source" ] && have_all; then echo "$BIN"; exit 0; fi
mkdir -p "$CACHE"
sdist=$CACHE/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$sdist" ]; then
  echo "downloading the llama-cpp-python $VERSION sdist (77 MB) into $CACHE" >&2
  "$PIP" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$CACHE" >&2
fi
if [ ! -f "$src/CMakeLists.txt" ]; then
  echo "extracting vendor/llama.cpp" >&2
  tar -xzf "$sdist" -C "$CACHE" "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi
# llama.cpp's common logger writes from a thread it never drains at exit (ggml-org/llama.cpp
# #22142): llama-perplexity's last lines (the KLD summary) were lost in 5 of 30 runs. Drain it.
grep -q 'common_log_pause(log); });' "$src/common/log.cpp" || sed -i \
  '/^        log = new common_log;$/a\        std::atexit([] { common_log_pause(log); }); // bitplan: drain the log queue at exit' \
  "$src/common/log.cpp"
grep -q 'common_log_pause(log); });' "$src/common/log.cpp" || {
  echo "could not patch $src/common/log.cpp (the log drain at exit)" >&2; exit 1; }
if [ "$ONLY_SOURCE" = "--source" ]; then echo "$src"; exit 0; fi
echo "building ${TOOLS[*]} (about 10 min on 2 cores, once per machine)" >&2
# static, CPU only, no network code: the tools read and write local GGUF files
cmake -S "$src" -B "$CACHE/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF >&2
ninja -C "$CACHE/build" "${TOOLS[@]}" >&2
touch "$STAMP"
have_all || { echo "llama.cpp build finished without ${TOOLS[*]}" >&2; exit 1; }
echo "$BIN"
