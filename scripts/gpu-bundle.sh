#!/usr/bin/env bash
# Builds, on this (Rust) machine, everything scripts/gpu-check.sh runs on a GPU host that has
# no Rust toolchain: the stripped release binary, the GPU test executables and MNIST.
#
#   scripts/gpu-bundle.sh [BUNDLE_DIR]        # default ./gpu-bundle (git-ignored)
#   BASELINE=<commit> scripts/gpu-bundle.sh   # also that commit's release binary, xz-packed
#
# With BASELINE, the bundle also holds `bntrain-base.xz` (~3 MB with PTX alone, ~5.5 MB with
# machine code), the release binary of that commit (built in a worktree under
# target/baseline), and `baseline.txt` naming it: gpu-check
# then times the seed's fused steps and the study with both builds in the same call (part
# "baseline"), where timings from two calls differ by a few per cent.
# Needs nvcc at build time (see README / build.rs); the data comes from $BNTRAIN_DATA or the
# cache (~/.cache/bntrain/mnist; run `bntrain data fetch` first). The bundle must stay under
# 64 MiB. Then, on the GPU host: `bash gpu-bundle/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle="${1:-gpu-bundle}"
tests=(gpu_kernels gpu_training)

# Whether binary $1 holds the kernel modules with machine code for the GPU host (sm_90) in
# every one: the fat binaries' headers (magic 0xBA55ED50; their entry headers stay
# uncompressed; layout in src/cuda/fatbin.rs), not a kernel's name, which the Rust code holds
# anyway. A baseline built before the fat binaries holds the PTX text instead (`.entry`, the
# cluster module's too), which the driver compiles.
has_kernels() {
    grep -qa '\.entry gather_rows_f32' "$1" && grep -qa '\.entry fused_cluster8_f32' "$1" && return 0
    python3 - "$1" <<'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
magic, modules = b"\x50\xed\x55\xba\x01\x00\x10\x00", []
at = data.find(magic)
while at >= 0 and at + 16 <= len(data):
    off, sm90 = at + 16, False
    end = min(off + struct.unpack_from("<Q", data, at + 8)[0], len(data))
    while off + 0x20 <= end:
        kind, _, header, payload = struct.unpack_from("<HHIQ", data, off)
        sm90 |= kind == 2 and struct.unpack_from("<I", data, off + 0x1c)[0] == 90
        if header < 0x20:
            break
        off += header + payload
    modules.append(sm90)
    at = data.find(magic, at + 1)
sys.exit(0 if modules and all(modules) else 1)
EOF
}

echo "== cargo build --release"
cargo build --release --bin bntrain
if ! has_kernels target/release/bntrain; then
    echo "gpu-bundle: target/release/bntrain lacks CUDA kernels with sm_90 machine code: nvcc was not found at build time (put it on PATH and rebuild), or BNTRAIN_SASS_ARCHS left sm_90 out" >&2
    exit 1
fi
echo "== cargo test --release --no-run"
json="$(cargo test --release --no-run --message-format=json $(printf -- '--test %s ' "${tests[@]}"))"

rm -rf "$bundle"
mkdir -p "$bundle/data"
cp target/release/bntrain "$bundle/bntrain"
for name in "${tests[@]}"; do
    exe="$(printf '%s\n' "$json" | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == name and m.get("executable"):
        print(m["executable"])
' "$name" | tail -n 1)"
    [[ -n "$exe" ]] || { echo "gpu-bundle: no executable found for test $name" >&2; exit 1; }
    has_kernels "$exe" || { echo "gpu-bundle: $exe lacks CUDA kernels with sm_90 machine code (built without nvcc?)" >&2; exit 1; }
    cp "$exe" "$bundle/$name"
done
if command -v strip >/dev/null; then
    strip "$bundle/bntrain" "${tests[@]/#/$bundle/}" 2>/dev/null || true
fi
cp scripts/gpu-check.sh scripts/compare-peers.sh scripts/ncu-source.py "$bundle/"

if [[ -n "${BASELINE:-}" ]]; then
    rev="$(git rev-parse --verify "${BASELINE}^{commit}")"
    echo "== the baseline: $(git log -1 --format='%h %s' "$rev" | cut -c1-100)"
    source_dir="target/baseline/src"
    git worktree remove --force "$source_dir" 2>/dev/null || rm -rf "$source_dir"
    git worktree prune
    git worktree add --detach "$source_dir" "$rev" >/dev/null
    (cd "$source_dir" && CARGO_TARGET_DIR="$PWD/../target" cargo build --release --bin bntrain)
    base="target/baseline/target/release/bntrain"
    has_kernels "$base" || { echo "gpu-bundle: the baseline build lacks CUDA kernels with sm_90 machine code (built without nvcc?)" >&2; exit 1; }
    cp "$base" "$bundle/bntrain-base"
    command -v strip >/dev/null && strip "$bundle/bntrain-base" 2>/dev/null || true
    xz -T0 -6 -f "$bundle/bntrain-base"
    git log -1 --format='%H %s' "$rev" > "$bundle/baseline.txt"
    git worktree remove --force "$source_dir"
fi
cp -r scripts/peers "$bundle/peers"

data="${BNTRAIN_DATA:-${BNTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bntrain}/mnist}"
for file in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [[ -f "$data/$file.gz" ]]; then
        cp "$data/$file.gz" "$bundle/data/"
    elif [[ -f "$data/$file" ]]; then
        gzip -9 -c "$data/$file" > "$bundle/data/$file.gz"
    else
        echo "gpu-bundle: $data/$file(.gz) not found; set BNTRAIN_DATA or run \`bntrain data fetch\`" >&2
        exit 1
    fi
done

bytes="$(du -sb "$bundle" | cut -f1)"
ls -l "$bundle" "$bundle/data"
echo "gpu-bundle: $bundle holds $((bytes / 1024 / 1024)) MiB"
if (( bytes >= 64 * 1024 * 1024 )); then
    echo "gpu-bundle: over the 64 MiB limit" >&2
    exit 1
fi
