#!/usr/bin/env bash
# Builds llama.cpp's OpenAI-compatible server (llama-server) into .venv/bin, from the llama.cpp sources
# that the llama-cpp-python sdist on PyPI vendors (the registry is reachable where hubs are not), at the
# version the [llamacpp] extra pins, so the in-process and the server backends run the same llama.cpp.
# Takes ~15-30 minutes on two cores; run once: `make llama-server`.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PY="${PY:-.venv/bin/python}"
DEST="$(dirname "$PY")/llama-server"
WORK="${TMPDIR:-/tmp}/flashback-llama-server-$VERSION"
JOBS="${JOBS:-$(nproc)}"
if [ -x "$DEST" ]; then echo "$DEST is there"; exit 0; fi
mkdir -p "$WORK"
if [ ! -d "$WORK/src" ]; then
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
  mkdir -p "$WORK/src" && tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK/src" --strip-components=1
fi
cmake -S "$WORK/src/vendor/llama.cpp" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  > "$WORK/configure.log"
cmake --build "$WORK/build" --target llama-server -j "$JOBS"
install -m 755 "$WORK/build/bin/llama-server" "$DEST"
echo "installed $DEST"
