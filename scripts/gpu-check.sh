#!/usr/bin/env bash
# Runs on a GPU host without Rust, from a bundle made by scripts/gpu-bundle.sh:
#   1. the GPU test executables with BNTRAIN_REQUIRE_GPU=1 (a missing GPU is a failure);
#   2. `bntrain info`; `bntrain train --device cuda` for 10000 steps on MNIST;
#   3. `bntrain bench --device cuda` on the seed and wide configurations, each with the
#      step replayed from a CUDA graph (the default) and launched eagerly
#      (BNTRAIN_CUDA_GRAPH=0), so both variants are measured in the same call;
#   4. optionally a peer anchor (python3 torch_anchor.py) on the same GPU, same call;
# then prints a summary table last.
#
#   bash gpu-check.sh [BUNDLE_DIR] [PATH/TO/torch_anchor.py]
# BUNDLE_DIR defaults to the directory of this script when it holds `bntrain`, else
# ./gpu-bundle. STEPS (default 10000) shortens the training run; REPRODUCE=0 skips the full
# study, RUN_PEERS=0 the PyTorch/JAX comparison.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ $# -ge 1 ]]; then bundle="$1"; elif [[ -x "$here/bntrain" ]]; then bundle="$here"; else bundle="./gpu-bundle"; fi
anchor="${2:-}"
steps="${STEPS:-10000}"
bin="$bundle/bntrain"
[[ -x "$bin" ]] || { echo "gpu-check: $bin not found (build the bundle with scripts/gpu-bundle.sh)" >&2; exit 2; }
# Every command (tests that train on real MNIST, train, bench, reproduce, the peers) reads
# the bundle's copy of MNIST.
export BNTRAIN_DATA="$bundle/data"
logs="$(mktemp -d)"
summary=()
failed=0
row() { summary+=("$(printf '%-34s %s' "$1" "$2")"); }
# The last line of a log that parses as JSON, then one field of it.
json_field() { python3 - "$1" "$2" <<'PY'
import json, sys
value = None
for line in open(sys.argv[1], errors="replace"):
    try:
        value = json.loads(line)
    except ValueError:
        pass
field = value.get(sys.argv[2]) if isinstance(value, dict) else None
print("?" if field is None else (f"{field:.4f}" if isinstance(field, float) else field))
PY
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(nvidia-smi unavailable)"

for test in gpu_kernels gpu_training; do
    echo "== $test"
    if [[ ! -x "$bundle/$test" ]]; then row "$test" "MISSING"; failed=1; continue; fi
    BNTRAIN_REQUIRE_GPU=1 timeout 600 "$bundle/$test" --test-threads=4 2>&1 | tee "$logs/$test.log"
    status=${PIPESTATUS[0]}
    result="$(grep -E '^test result:' "$logs/$test.log" | tail -n 1 | sed 's/^test result: //; s/; finished.*//')"
    if [[ $status -eq 0 ]]; then row "$test" "PASS ${result}"; else row "$test" "FAIL (exit $status) ${result}"; failed=1; fi
done

echo "== bntrain info"
timeout 120 "$bin" info 2>&1 | tee "$logs/info.log"

echo "== bntrain train --device cuda --steps $steps"
timeout 900 "$bin" train --device cuda --data "$bundle/data" --steps "$steps" --json 2>&1 | tee "$logs/train.log"
if [[ ${PIPESTATUS[0]} -eq 0 ]]; then
    acc="$(json_field "$logs/train.log" test_accuracy)"
    secs="$(json_field "$logs/train.log" seconds)"
    us="$(python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]) * 1e6:.1f}')" "$secs" "$steps" 2>/dev/null || echo '?')"
    row "train $steps steps (BN, cuda)" "test accuracy $acc, $secs s ($us µs/step incl. evaluation)"
else
    row "train $steps steps (BN, cuda)" "FAIL"; failed=1
fi

# A bench takes seconds (20 warm-up steps, then 7 runs of ~0.3 s); the 120 s cap only keeps
# a hang from eating the call.
for config in seed wide; do
    for graph in 1 0; do
        if [[ $graph == 1 ]]; then variant="cuda graph"; else variant="eager"; fi
        log="$logs/bench-$config-graph$graph.log"
        echo "== BNTRAIN_CUDA_GRAPH=$graph bntrain bench --device cuda --config $config"
        BNTRAIN_CUDA_GRAPH=$graph timeout 120 "$bin" bench --device cuda --config "$config" --json 2>&1 | tee "$log"
        if [[ ${PIPESTATUS[0]} -eq 0 ]]; then
            row "bench $config ($variant)" "$(json_field "$log" us_per_step) µs/step (median), device: $(json_field "$log" device)"
        else
            row "bench $config ($variant)" "FAIL"; failed=1
        fi
    done
done

# The whole study (issue 4): its wall time on the GPU goes to docs/perf.md. REPRODUCE=0 skips.
if [[ "${REPRODUCE:-1}" == 1 ]]; then
    echo "== bntrain reproduce --device cuda (the full study)"
    out_runs="${OUT:-$logs}/runs"
    start=$(date +%s.%N)
    timeout 900 "$bin" --device cuda reproduce --data "$bundle/data" --out "$out_runs" --name gpu --json 2>&1 | tee "$logs/reproduce.log"
    status=${PIPESTATUS[0]}
    wall="$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")"
    if [[ $status -eq 0 ]]; then row "reproduce (full, cuda)" "${wall} s wall; report in $out_runs/gpu"; else row "reproduce (full, cuda)" "FAIL (exit $status)"; failed=1; fi
fi

# Our own PyTorch and JAX versions of the same step, same GPU, same call (issue 5). RUN_PEERS=0 skips.
if [[ "${RUN_PEERS:-1}" == 1 && -f "$bundle/compare-peers.sh" ]]; then
    echo "== compare-peers.sh"
    DATA="$bundle/data" timeout 600 bash "$bundle/compare-peers.sh" "$bin" 2>&1 | tee "$logs/peers.log"
    row "peers (see the table above)" "exit ${PIPESTATUS[0]}"
fi

if [[ -n "$anchor" ]]; then
    echo "== python3 $anchor (peer anchor, same GPU)"
    QUICK="${QUICK:-1}" timeout 600 python3 "$anchor" "$bundle/data" 2>&1 | tee "$logs/anchor.log"
    row "anchor $(basename "$anchor")" "exit ${PIPESTATUS[0]}, see the JSON lines above"
fi

echo
echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1))"
printf '%s\n' "${summary[@]}"
echo "logs: $logs"
exit $failed
