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
# The cooperative kernel again under ThreadSanitizer: blocks run as concurrent threads, so a
# read of another block's data that no grid barrier orders is reported as a race even when
# the schedule happened not to corrupt it.
g++ -std=c++20 -O1 -g -pthread -w -fsanitize=thread -I cuda -x c++ tests/kernel_emulation/harness.cpp -o "$out/harness-tsan"
TSAN_OPTIONS="halt_on_error=1 exitcode=66" "$out/harness-tsan" fused
# The one-barrier kernel at the seed's shape too (784 pixels in 16-byte chunks, blocks of 256
# and 512 threads), the launch it will first run on a GPU: minutes, not seconds.
TSAN_OPTIONS="halt_on_error=1 exitcode=66" "$out/harness-tsan" replicated seed
# And under AddressSanitizer: each block's dynamic shared memory is exactly the bytes the
# layout asked for, and every buffer a std::vector of its own size, so a read or write past
# either (which the GPU would not report, or report as a fault far from its cause) stops the run
# with the .cu line (what compute-sanitizer's memcheck would say on a GPU).
g++ -std=c++20 -O1 -g -pthread -w -fsanitize=address -fno-omit-frame-pointer -I cuda -x c++ tests/kernel_emulation/harness.cpp -o "$out/harness-asan"
ASAN_OPTIONS="halt_on_error=1 exitcode=67" "$out/harness-asan" fused
