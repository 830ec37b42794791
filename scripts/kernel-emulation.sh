#!/usr/bin/env bash
# Checks every CUDA kernel on the CPU: compiles cuda/*.cu as C++20 against
# tests/kernel_emulation/cuda_emu.h and runs the harness, which compares each kernel with a
# double-precision reference on awkward sizes. Needs only g++ (no GPU, no nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
g++ -std=c++20 -O1 -pthread -w -I cuda -x c++ tests/kernel_emulation/harness.cpp -o "$out/harness"
"$out/harness"
