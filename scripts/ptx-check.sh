#!/usr/bin/env bash
# Compiles every cuda/*.cu to PTX the way build.rs does and assembles it with ptxas for
# sm_80 (A100) and sm_90 (H100/H200) (a source that asks for compute_90 on its first line:
# sm_90 only), printing registers, shared memory and spills per kernel. Fails on any
# compiler or assembler error; warns about spills.
#
#   scripts/ptx-check.sh            # nvcc from $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin or PATH
#   BNTRAIN_PTX_ARCH=compute_80 scripts/ptx-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc="${NVCC:-}"
for candidate in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
    [[ -z "$nvcc" && -n "$candidate" && -x "$candidate" ]] && nvcc="$candidate"
done
if [[ -z "$nvcc" ]]; then
    echo "ptx-check: nvcc not found (set NVCC, CUDA_HOME, or put it on PATH)" >&2
    exit 1
fi
ptxas="$(dirname "$nvcc")/ptxas"
[[ -x "$ptxas" ]] || ptxas="$(command -v ptxas)"
arch="${BNTRAIN_PTX_ARCH:-compute_75}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

echo "nvcc: $("$nvcc" --version | grep release)   PTX for $arch"
status=0
for source in cuda/*.cu; do
    name="$(basename "$source" .cu)"
    # As build.rs: a first line `// bntrain: ptx-arch compute_NN` asks for a newer target,
    # which only GPUs of that compute capability (and ptxas for them) take.
    source_arch="$arch" sms=(sm_80 sm_90)
    wanted="$(head -n 1 "$source" | sed -n 's|^// bntrain: ptx-arch compute_\([0-9]*\)$|\1|p')"
    if [[ -n "$wanted" && "$wanted" -gt "${arch#compute_}" ]]; then
        source_arch="compute_$wanted" sms=()
        for sm in sm_80 sm_90; do [[ "${sm#sm_}" -ge "$wanted" ]] && sms+=("$sm"); done
    fi
    if [[ ${#sms[@]} -eq 0 ]]; then
        echo "ptx-check: $name asks for compute_$wanted, newer than every GPU checked here (sm_80, sm_90)" >&2
        status=1; continue
    fi
    "$nvcc" -ptx "-arch=$source_arch" -lineinfo -Wno-deprecated-gpu-targets -Icuda -o "$out/$name.ptx" "$source"
    for sm in "${sms[@]}"; do
        report="$("$ptxas" "-arch=$sm" -v "$out/$name.ptx" -o /dev/null 2>&1)" || { echo "$report"; echo "ptxas failed on $name for $sm" >&2; status=1; continue; }
        # "Compiling entry function 'k' for 'sm_90'" then "Used N registers, ..." per kernel.
        echo "$report" | awk -v sm="$sm" '
            /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); kernel = substr($0, RSTART + 1, RLENGTH - 2) }
            /bytes stack frame/ { spill = $0; sub(/^ +/, "", spill) }
            /Used [0-9]+ registers/ { used = $0; sub(/.*: +/, "", used); printf "  %-6s %-28s %s; %s\n", sm, kernel, used, spill }'
        if echo "$report" | grep -E "[1-9][0-9]* bytes spill (stores|loads)" >/dev/null; then
            echo "ptx-check: warning: $name spills registers on $sm" >&2
        fi
    done
done
[[ $status -eq 0 ]] && echo "ptx-check: every kernel assembles for sm_80 and sm_90 (those built for compute_90: sm_90)"
exit $status
