#!/usr/bin/env bash
# Builds the release binary `bntrain` and copies it to an output directory.
#
# This is the one recipe for a release build: the Dockerfile's build stage runs
# it, and CI runs it outside docker (there is no docker engine in CI), so the
# steps that make the image's binary are tested even where no image is built.
#
#   scripts/build-release.sh [OUT_DIR]          # OUT_DIR defaults to dist/
#
# Environment:
#   NVCC                  nvcc to use. Otherwise: $CUDA_HOME/bin/nvcc,
#                         $CUDA_PATH/bin/nvcc, nvcc on PATH, /usr/local/cuda/bin/nvcc,
#                         then the pip install of ../shared/GPU.md
#                         (/opt/nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc).
#                         The one found is exported as NVCC, so build.rs uses it.
#   BNTRAIN_REQUIRE_NVCC  1: fail when no nvcc is found. Otherwise the binary is
#                         built without CUDA kernels (it still runs --device cpu)
#                         and a warning says so.
#   BNTRAIN_PTX_ARCH      PTX target passed through to build.rs (its default:
#                         compute_75, i.e. compute capability 7.5 and newer).
#   BNTRAIN_SASS_ARCHS    GPUs to carry machine code for, passed through to
#                         build.rs (its default: sm_80,sm_90; none: PTX only).
#   CARGO_TARGET_DIR      honoured; the binary is taken from there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

out="${1:-dist}"
if [[ $# -gt 1 ]]; then
    echo "usage: $0 [OUT_DIR]" >&2
    exit 2
fi

warn() { echo "build-release: warning: $*" >&2; }
die() { echo "build-release: error: $*" >&2; exit 1; }
info() { echo "build-release: $*"; }

# --- nvcc -------------------------------------------------------------------
# PTX carries the ISA of the nvcc that wrote it, and a driver refuses PTX newer
# than itself: nvcc 13.0 writes ISA 9.0, which CUDA 13.0 drivers load.
nvcc_pin="13.0"

find_nvcc() {
    local candidate
    for candidate in \
        "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" \
        "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" \
        "$(command -v nvcc 2>/dev/null || true)" \
        /usr/local/cuda/bin/nvcc \
        /opt/nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

nvcc_path=""
if [[ -n "${NVCC:-}" ]]; then
    nvcc_path="$(command -v "$NVCC" 2>/dev/null || true)"
    [[ -n "$nvcc_path" && -x "$nvcc_path" ]] || die "NVCC=$NVCC is not an executable"
else
    nvcc_path="$(find_nvcc || true)"
fi

if [[ -n "$nvcc_path" ]]; then
    export NVCC="$nvcc_path"
    # nvcc from pip finds ptxas, cudafe++, ... next to itself; keep them on PATH.
    nvcc_dir="$(dirname "$nvcc_path")"
    export PATH="$nvcc_dir:$PATH"
    nvcc_release="$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')"
    info "nvcc: $NVCC (CUDA ${nvcc_release:-unknown release})"
    if [[ "$nvcc_release" != "$nvcc_pin" ]]; then
        warn "nvcc ${nvcc_release:-?} is not the pinned $nvcc_pin: its PTX may be refused by" \
            "drivers older than it (CUDA_ERROR_UNSUPPORTED_PTX_VERSION)"
    fi
    sass="${BNTRAIN_SASS_ARCHS-build.rs default (sm_80,sm_90)}"
    info "PTX target: ${BNTRAIN_PTX_ARCH:-build.rs default (compute_75)}; machine code for: ${sass:-none (PTX only)}"
elif [[ "${BNTRAIN_REQUIRE_NVCC:-0}" == 1 ]]; then
    die "nvcc not found and BNTRAIN_REQUIRE_NVCC=1 (set NVCC, CUDA_HOME or PATH)"
else
    warn "nvcc not found: CUDA kernels are left out; the binary runs --device cpu only." \
        "Set NVCC (or CUDA_HOME, or put nvcc on PATH) to build them."
fi

# --- build ------------------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust with rustup)"
info "$(cargo --version), $(rustc --version)"
cargo build --release --locked --bin bntrain

target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin="$target_dir/release/bntrain"
[[ -x "$bin" ]] || die "cargo succeeded but $bin is missing"

# --- install into OUT_DIR -----------------------------------------------------
mkdir -p "$out"
install -m 0755 "$bin" "$out/bntrain"

# Smoke test: the copied binary starts (no GPU and no data needed).
"$out/bntrain" --help >/dev/null || die "$out/bntrain --help failed"

size_bytes="$(stat -c %s "$out/bntrain")"
info "wrote $out/bntrain: $size_bytes bytes ($(du -h "$out/bntrain" | cut -f1))"
