#!/usr/bin/env bash
# Build llama.cpp's quantize/imatrix tools and install llama-cpp-python on top of that build,
# for scripts/bench_peers.py. Everything comes from the llama-cpp-python sdist on PyPI (it vendors
# llama.cpp), so it works where only the package registry is reachable. About 15 min on 2 cores.
#   bash scripts/setup_llama_cpp.sh [VERSION]
set -euo pipefail
VERSION="${1:-0.3.36}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)/models/.llama.cpp"
mkdir -p "$ROOT/downloads"
if [ ! -d "$ROOT/src" ]; then
  # Only the binding itself as source: ":all:" would also build its build tools (cmake, hatchling) from source.
  [ -f "$ROOT/downloads/llama_cpp_python-$VERSION.tar.gz" ] ||
    python -m pip download --no-deps --no-binary=llama-cpp-python "llama-cpp-python==$VERSION" -d "$ROOT/downloads"
  tar -xzf "$ROOT/downloads/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
  mv "$ROOT/llama_cpp_python-$VERSION" "$ROOT/src"
fi
cmake -S "$ROOT/src/vendor/llama.cpp" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON
cmake --build "$ROOT/build" -j "$(nproc)" --target llama-quantize llama-imatrix llama
# The Python binding without its own copy of llama.cpp; it loads the libraries built above
# (scripts/llama_cpp_peer.py sets LLAMA_CPP_LIB_PATH).
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python -m pip install "$ROOT/downloads/llama_cpp_python-$VERSION.tar.gz"
# convert_hf_to_gguf.py reads SentencePiece tokenizers (Llama-family vocabularies, SmolLM2's too).
python -m pip install "sentencepiece>=0.2"
echo "llama.cpp tools in $ROOT/build/bin"
