#!/usr/bin/env bash
# Builds llama.cpp's llama-bench (CPU) from the llama.cpp sources vendored in the
# llama-cpp-python sdist on PyPI (a registry every machine here reaches), so that flowgate and
# llama.cpp can be measured side by side on the same machine and the same files:
#
#   tools/llamacpp/build.sh [OUT_DIR]          # default: target/llamacpp
#   flowgate bench decode MODEL -t 2 --llama-bench target/llamacpp/llama-bench
#
# Needs python3 + pip (cmake and ninja come from PyPI) and a C++ compiler. Takes ~15 minutes on
# 2 cores. The version is pinned so that figures are reproducible.
set -euo pipefail
VERSION=0.3.36
OUT=${1:-target/llamacpp}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip install --quiet --disable-pip-version-check cmake ninja
# The sdist (pip prepares its metadata in an isolated environment first: a minute or two).
python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  -d "$WORK" "llama-cpp-python==$VERSION"
tar -xzf "$WORK"/llama_cpp_python-$VERSION.tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DBUILD_SHARED_LIBS=OFF
ninja -C "$WORK/build" llama-bench
mkdir -p "$OUT"
cp "$WORK/build/bin/llama-bench" "$OUT/"
echo "built $OUT/llama-bench (llama.cpp from llama-cpp-python $VERSION)"
