#!/usr/bin/env bash
# Builds, on this (Rust) machine, everything scripts/gpu-check.sh runs on a GPU host that has
# no Rust toolchain: the stripped release binary, the GPU test executables and MNIST.
#
#   scripts/gpu-bundle.sh [BUNDLE_DIR]        # default ./gpu-bundle (git-ignored)
#   BASELINE=<commit> scripts/gpu-bundle.sh   # also that commit's release binary, xz-packed
#
# With BASELINE, the bundle also holds `bntrain-base.xz` (~3 MB), the release binary of that
# commit (built in a worktree under target/baseline), and `baseline.txt` naming it: gpu-check
# then times the seed's fused steps and the study with both builds in the same call (part
# "baseline"), where timings from two calls differ by a few per cent.
# Needs nvcc at build time (see README / build.rs); the data comes from $BNTRAIN_DATA or the
# cache (~/.cache/bntrain/mnist; run `bntrain data fetch` first). The bundle must stay under
# 64 MiB. Then, on the GPU host: `bash gpu-bundle/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle="${1:-gpu-bundle}"
tests=(gpu_kernels gpu_training)

echo "== cargo build --release"
cargo build --release --bin bntrain
# The kernels' PTX itself (`.entry`), not a kernel's name, which the Rust code holds anyway:
# a build without nvcc has no PTX. The sm_90 module (the cluster kernels) as well.
if ! grep -qa '\.entry gather_rows_f32' target/release/bntrain || ! grep -qa '\.entry fused_cluster8_f32' target/release/bntrain; then
    echo "gpu-bundle: target/release/bntrain has no CUDA kernels: nvcc was not found at build time (put it on PATH and rebuild)" >&2
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
    grep -qa '\.entry gather_rows_f32' "$exe" || { echo "gpu-bundle: $exe has no CUDA kernels (built without nvcc)" >&2; exit 1; }
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
    grep -qa '\.entry gather_rows_f32' "$base" || { echo "gpu-bundle: the baseline build has no CUDA kernels (built without nvcc)" >&2; exit 1; }
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
