#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` and `llama-quantize` (benchmark peers only) from the sources
# shipped inside the `llama-cpp-python` sdist on PyPI, into a cache outside the repo.
#   scripts/bench/build_llama_server.sh [CACHE_DIR]   (default: ~/.cache/sagemaker-llm/llama.cpp)
# Prints the bin folder. A second run reuses the build.
set -euo pipefail
cache=${1:-${LLAMA_CPP_CACHE:-$HOME/.cache/sagemaker-llm/llama.cpp}}
bin="$cache/build/bin"
if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-quantize" ]; then
    echo "$bin"; exit 0
fi
mkdir -p "$cache"
py=${PYTHON:-python3}
tools="$cache/tools"
[ -x "$tools/bin/cmake" ] || { "$py" -m venv "$tools" && "$tools/bin/pip" install -q cmake ninja; }
if [ ! -d "$cache/src" ]; then
    "$tools/bin/pip" download -q --no-binary :all: --no-deps -d "$cache/sdist" llama-cpp-python
    tar -C "$cache" -xzf "$cache"/sdist/llama_cpp_python-*.tar.gz
    mv "$cache"/llama_cpp_python-*/vendor/llama.cpp "$cache/src"
fi
# Native CPU flags (AVX2/AVX-512 as the machine has), no GPU, no network features.
"$tools/bin/cmake" -S "$cache/src" -B "$cache/build" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$tools/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON >&2
"$tools/bin/cmake" --build "$cache/build" --target llama-server llama-quantize -j "$(nproc)" >&2
echo "$bin"
