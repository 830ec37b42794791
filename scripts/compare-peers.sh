#!/usr/bin/env bash
# bntrain's training step next to our own PyTorch and JAX versions of it (scripts/peers/),
# on the same device in one call; prints µs per step and the ratio peer/bntrain, last.
# Needs no Rust and no network: the GPU host runs it on a binary built elsewhere
# (scripts/gpu-bundle.sh).
#
#   bash scripts/compare-peers.sh [PATH/TO/bntrain]          # default ./gpu-bundle/bntrain
#
# Environment:
#   DEVICE=cuda|cpu   where everything runs (default cuda; cpu for a test without a GPU)
#   PYTHON=python3    the interpreter for the peers (with torch and/or jax)
#   PEERS=torch,jax   which peers run; one whose module does not import is skipped
#   QUICK=1           short measurements (bntrain --runs 3 --seconds 0.05, peers --quick)
#   CHECK=1           first, the peers' losses over 5 steps from one fixed init against
#                     a float64 numpy reference (scripts/peers/ref_step.py); 0 skips it
#   CFGS=seed,wide    configurations to measure
#   DATA=DIR          everyone trains on the first twelve batches of MNIST's training set in DIR
#                     (bntrain bench --data DIR, the peers --mnist DIR); unset: random bytes
#                     (bntrain bench --noise). The data matter for bntrain's CPU path only: it
#                     skips zero pixels (MNIST's are 81% zero).
#   STEP_VARIANTS=graph,fused,staged   (cuda) time bntrain once per BNTRAIN_CUDA_STEP variant
#                     (`staged`: fused with BNTRAIN_FUSED_STAGE=1; `tuned`: graph with
#                     BNTRAIN_GEMM_TUNE=1, wide only; `cluster`: fused with
#                     BNTRAIN_FUSED_CLUSTER=1, seed only; `replicated`: fused with
#                     BNTRAIN_FUSED_REPLICATED=512, seed only; `streams`: graph with
#                     BNTRAIN_BACKWARD_STREAMS=1, wide only; `tuned-streams`: both, wide only),
#                     as rows bntrain-graph, bntrain-fused, bntrain-staged, bntrain-tuned, …;
#                     ratios are against the fastest of them.
#                     Unset: one row, `bntrain`, with whatever BNTRAIN_CUDA_STEP says
#   BENCH_ARGS, PEER_ARGS   extra arguments for `bntrain bench` and for both peer scripts
#   BENCH_TIMEOUT=120, PEER_TIMEOUT=240   seconds per bntrain bench / per peer script
#   BUDGET=540        seconds for the whole script: each command's timeout is cut so that the
#                     table still prints within it (for a device call limited to 600 s)
#   OUT               where results.jsonl and the logs go (default: a new temporary dir)
#
# Exit status: 0; 1 when a bntrain bench failed; 3 when a peer script failed; 4 when a
# peer's losses disagree with the reference; 2 when the binary is missing.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
peers_dir="$here/peers"
bin="${1:-./gpu-bundle/bntrain}"
device="${DEVICE:-cuda}"
python="${PYTHON:-python3}"
peers="${PEERS:-torch,jax}"
cfgs="${CFGS:-seed,wide}"
check="${CHECK:-1}"
bench_timeout="${BENCH_TIMEOUT:-120}"
peer_timeout="${PEER_TIMEOUT:-240}"
budget="${BUDGET:-540}"
read -r -a bench_extra <<< "${BENCH_ARGS:-}"
read -r -a peer_extra <<< "${PEER_ARGS:-}"
if [[ -n "${DATA:-}" ]]; then
    [[ -d "$DATA" ]] || { echo "compare-peers: DATA=$DATA is not a directory" >&2; exit 2; }
    bench_data=(--data "$DATA"); peer_data=(--mnist "$DATA"); data_label="MNIST's first 12 batches"
else
    bench_data=(--noise); peer_data=(); data_label="random bytes"
fi
if [[ "${QUICK:-0}" == 1 ]]; then
    bench_extra=(--runs 3 --seconds 0.05 "${bench_extra[@]}")
    peer_extra=(--quick "${peer_extra[@]}")
fi
case "$device" in cuda|cpu) ;; *) echo "compare-peers: DEVICE must be cuda or cpu (got $device)" >&2; exit 2 ;; esac
[[ -x "$bin" ]] || { echo "compare-peers: $bin is not an executable (build it with scripts/gpu-bundle.sh, or pass its path)" >&2; exit 2; }
command -v "$python" >/dev/null || { echo "compare-peers: $python not found (set PYTHON)" >&2; exit 2; }

if [[ -n "${OUT:-}" ]]; then logs="$OUT/compare-peers"; else logs="$(mktemp -d)"; fi
mkdir -p "$logs"
results="$logs/results.jsonl"
: > "$results"
status=0
notes=()
fail() { # CODE MESSAGE: keeps the most important exit code (1 before 3 before 4)
    notes+=("$2")
    if [[ $status -eq 0 || ( $1 -lt $status ) ]]; then status=$1; fi
}
# limit WANTED NAME: sets t to WANTED seconds, or to what is left of BUDGET (less 15 s for
# the table) if less; fails (and the caller skips the command) when under 10 s are left.
limit() {
    local left=$((budget - SECONDS - 15))
    if (( left < 10 )); then notes+=("out of BUDGET=${budget}s: skipped $2"); return 1; fi
    t=$(( $1 < left ? $1 : left ))
}

echo "== compare-peers: $bin, DEVICE=$device, PYTHON=$python, logs in $logs"
if [[ "$device" == cuda ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(nvidia-smi unavailable)"
fi

# 1. bntrain, each configuration with and without BN (and each step variant asked for).
IFS=, read -r -a cfg_list <<< "$cfgs"
variants=("")
if [[ -n "${STEP_VARIANTS:-}" ]]; then
    IFS=, read -r -a listed <<< "$STEP_VARIANTS"
    variants=()
    for v in "${listed[@]}"; do [[ -n "$v" ]] && variants+=("$v"); done
    [[ ${#variants[@]} -gt 0 ]] || variants=("")
fi
for cfg in "${cfg_list[@]}"; do
    for bn in bn no-bn; do
        for variant in "${variants[@]}"; do
            # The seed network has no GEMM large enough to tune: its `tuned` row would be
            # another graph run; its steps are fused, so a second stream for the backward's
            # GEMMs is measured on the wide one.
            [[ ( $variant == tuned || $variant == *streams ) && $cfg == seed ]] && continue
            # Nor do the cluster and the one-barrier kernels take the wide network (batch
            # 1024 > 64; 1024 neurons a layer).
            [[ ( $variant == cluster || $variant == replicated ) && $cfg == wide ]] && continue
            flag=(); [[ $bn == no-bn ]] && flag=(--no-bn)
            name="bench-$cfg-$bn${variant:+-$variant}"
            impl="bntrain${variant:+-$variant}"
            case "$variant" in
                "") step_env=() ;;
                staged) step_env=(env BNTRAIN_CUDA_STEP=fused BNTRAIN_FUSED_STAGE=1) ;;
                # graph and tuned: the weight gradients on the training stream (a second
                # stream is the f32 default; `streams` rows time it).
                graph) step_env=(env BNTRAIN_CUDA_STEP=graph BNTRAIN_BACKWARD_STREAMS=0) ;;
                tuned) step_env=(env BNTRAIN_CUDA_STEP=graph BNTRAIN_GEMM_TUNE=1 BNTRAIN_BACKWARD_STREAMS=0) ;;
                streams) step_env=(env BNTRAIN_CUDA_STEP=graph BNTRAIN_BACKWARD_STREAMS=1) ;;
                tuned-streams) step_env=(env BNTRAIN_CUDA_STEP=graph BNTRAIN_GEMM_TUNE=1 BNTRAIN_BACKWARD_STREAMS=1) ;;
                cluster) step_env=(env BNTRAIN_CUDA_STEP=fused BNTRAIN_FUSED_CLUSTER=1) ;;
                replicated) step_env=(env BNTRAIN_CUDA_STEP=fused BNTRAIN_FUSED_REPLICATED=512) ;;
                *) step_env=(env "BNTRAIN_CUDA_STEP=$variant") ;;
            esac
            echo "== ${step_env[*]:1}${step_env[*]:+ }$bin --device $device bench --config $cfg ${flag[*]} ${bench_data[*]} --json ${bench_extra[*]}"
            limit "$bench_timeout" "$impl $name" || { status=1; continue; }
            timeout "$t" "${step_env[@]}" "$bin" --device "$device" bench --config "$cfg" "${flag[@]}" "${bench_data[@]}" --json "${bench_extra[@]}" \
                > "$logs/$name.out" 2> "$logs/$name.err"
            rc=$?
            tail -n 3 "$logs/$name.err" | grep -v '^\s*$' >&2
            cat "$logs/$name.out"
            if [[ $rc -ne 0 ]]; then
                fail 1 "$impl bench --config $cfg ${flag[*]} failed (exit $rc): $(tail -n 1 "$logs/$name.err")"
                continue
            fi
            # Its last stdout line, in the peers' schema.
            if ! tail -n 1 "$logs/$name.out" | "$python" -c '
import json, sys
r = json.loads(sys.stdin.read())
print(json.dumps({"impl": sys.argv[1], "cfg": r["config"], "bn": r["batch_norm"], "batch": r["batch_size"],
                      "us_per_step": r["us_per_step"], "us_min": r.get("us_per_step_min"),
                      "us_max": r.get("us_per_step_max"), "device": r["device"]}))' "$impl" >> "$results"; then
                fail 1 "$impl bench --config $cfg ${flag[*]}: no JSON on the last line of stdout"
            fi
        done
    done
done

# 2. The peers: which import.
available=()
IFS=, read -r -a peer_list <<< "$peers"
for peer in "${peer_list[@]}"; do
    case "$peer" in torch|jax) ;; *) echo "compare-peers: unknown peer $peer (torch, jax)" >&2; exit 2 ;; esac
    if version="$("$python" -c "import $peer; print($peer.__version__)" 2>/dev/null)"; then
        echo "== $peer $version"
        available+=("$peer")
    else
        notes+=("$peer does not import with $python: skipped")
    fi
done

# 3. Agreement: a few steps of each peer against the float64 reference.
if [[ "$check" == 1 && ${#available[@]} -gt 0 ]]; then
    echo "== check: losses of 5 steps from one fixed init (seed config), peers vs float64 numpy"
    if limit 60 "ref_step.py" && timeout "$t" "$python" "$peers_dir/ref_step.py" --check 5 --cfg seed "${peer_data[@]}" > "$logs/check-ref.out" 2> "$logs/check-ref.err"; then
        cat "$logs/check-ref.out" >> "$results"
        for peer in "${available[@]}"; do
            limit 90 "$peer --check" || break
            if timeout "$t" "$python" "$peers_dir/${peer}_step.py" --device "$device" --check 5 --cfg seed "${peer_data[@]}" \
                > "$logs/check-$peer.out" 2> "$logs/check-$peer.err"; then
                cat "$logs/check-$peer.out" >> "$results"
            else
                fail 3 "$peer --check failed: $(tail -n 1 "$logs/check-$peer.err")"
            fi
        done
    else
        notes+=("reference check skipped: ref_step.py did not run or failed ($(tail -n 1 "$logs/check-ref.err" 2>/dev/null))")
    fi
fi

# 4. The peers' timings.
for peer in "${available[@]}"; do
    echo "== $python scripts/peers/${peer}_step.py --device $device --cfg $cfgs ${peer_data[*]} ${peer_extra[*]}"
    limit "$peer_timeout" "${peer}_step.py" || continue
    timeout "$t" "$python" "$peers_dir/${peer}_step.py" --device "$device" --cfg "$cfgs" "${peer_data[@]}" "${peer_extra[@]}" \
        2> "$logs/$peer.err" | tee "$logs/$peer.out"
    rc=${PIPESTATUS[0]}
    grep -v '^\s*$' "$logs/$peer.err" | tail -n 5 >&2
    grep '^{' "$logs/$peer.out" >> "$results"
    if [[ $rc -eq 124 ]]; then
        fail 3 "${peer}_step.py timed out after ${t}s (its lines so far are in the table)"
    elif [[ $rc -ne 0 ]]; then
        fail 3 "${peer}_step.py failed (exit $rc): $(tail -n 1 "$logs/$peer.err")"
    fi
done

# 5. The table, last.
"$python" - "$results" "$device" "$data_label" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
timed = [r for r in rows if "us_per_step" in r]
checks = [r for r in rows if r.get("check")]
devices = sorted({r["device"] for r in timed})
print()
print(f"== bntrain vs peers on {', '.join(devices) or sys.argv[2]}: µs per training step (median), fp32, TF32 off,"
      f" data: {sys.argv[3]}")
print("   ratio = peer µs / bntrain µs, against bntrain's fastest row (above 1: bntrain is faster)")
head = f"{'config':<22} {'impl':<26} {'µs/step':>10} {'peer/bntrain':>13}"
print(head)
print("-" * len(head))
keys = []
for r in timed:
    key = (r["cfg"], r["bn"], r["batch"])
    if key not in keys:
        keys.append(key)
keys.sort(key=lambda k: (["seed", "wide"].index(k[0]) if k[0] in ("seed", "wide") else 9, not k[1]))
best = []
for key in keys:
    cfg, bn, batch = key
    label = f"{cfg} {'BN' if bn else 'plain'} batch {batch}"
    group = [r for r in timed if (r["cfg"], r["bn"], r["batch"]) == key]
    mine = [r for r in group if r["impl"].startswith("bntrain")]
    fastest = min(mine, key=lambda r: r["us_per_step"]) if mine else None
    ours = fastest["us_per_step"] if fastest else None
    group.sort(key=lambda r: (not r["impl"].startswith("bntrain"), r["impl"]))
    for r in group:
        ratio = "" if ours is None or r["impl"].startswith("bntrain") else f"{r['us_per_step'] / ours:.2f}x"
        print(f"{label:<22} {r['impl']:<26} {r['us_per_step']:>10.1f} {ratio:>13}")
        label = ""
    peers = [r for r in group if not r["impl"].startswith("bntrain")]
    if ours is not None and peers:
        b = min(peers, key=lambda r: r["us_per_step"])
        best.append(f"{cfg} {'BN' if bn else 'plain'}: {fastest['impl']} {ours:.1f} µs, best peer {b['impl']} "
                    f"{b['us_per_step']:.1f} µs, ratio {b['us_per_step'] / ours:.2f}x")
if checks:
    ref = {(r["cfg"], r["bn"]): r for r in checks if r["impl"] == "numpy-f64"}
    print()
    print("== agreement with the float64 reference (5 steps, fixed init): max relative difference")
    bad = False
    for r in checks:
        if r["impl"] == "numpy-f64":
            continue
        f = ref.get((r["cfg"], r["bn"]))
        if f is None:
            continue
        d = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(r["losses"], f["losses"]))
        dl1 = abs(r["params_l1"] - f["params_l1"]) / abs(f["params_l1"])
        ok = d < 1e-4 and dl1 < 1e-4 and len(r["losses"]) == len(f["losses"])
        bad |= not ok
        print(f"   {r['impl']:<24} {r['cfg']} {'BN' if r['bn'] else 'plain':<5} losses {d:.1e}  "
              f"params L1 {dl1:.1e}  {'OK' if ok else 'MISMATCH (> 1e-4)'}")
    if bad:
        open(sys.argv[1] + ".mismatch", "w").close()
if best:
    print()
    print("== best peer per configuration")
    for line in best:
        print("   " + line)
PY
[[ -e "$results.mismatch" ]] && fail 4 "a peer's losses disagree with the float64 reference"
rm -f "$results.mismatch"
if [[ ${#notes[@]} -gt 0 ]]; then
    echo
    printf 'note: %s\n' "${notes[@]}"
fi
echo "results: $results (exit $status)"
exit $status
