#!/usr/bin/env bash
# Runs on a GPU host without Rust, from a bundle made by scripts/gpu-bundle.sh, in order of
# importance (each step only starts while enough of BUDGET is left; every command runs
# under `timeout -k 10`, so that even a hung kernel cannot hold the call):
#   0. `bntrain info` (the kernel modules load here, timed: the binary's sm_90 machine code,
#      or the driver compiles their PTX where it has none), then smoke tests
#      of the fused grid kernel and of the cluster kernel (300 steps each; a failure skips
#      every later run of that kernel);
#   1. the GPU test executables with BNTRAIN_REQUIRE_GPU=1 (a missing GPU is a failure): the
#      kernels, the unfused training tests, and the fused and the cluster kernels' tests
#      each in a process of their own; then Compute Sanitizer (memcheck, racecheck,
#      synccheck) on each fused kernel whose smoke test or tests failed, to say where;
#   2. `bntrain info`; `bntrain train --device cuda` for 10000 steps on MNIST, in f32 (CUDA
#      graph, then the fused kernel), then with tf32 and bf16 GEMMs (accuracy against f32's);
#   3. `bntrain bench --device cuda` on the seed and wide configurations with each way of
#      launching a step (BNTRAIN_CUDA_STEP=fused, graph, eager), the seed one also fused with
#      staging (BNTRAIN_FUSED_STAGE=1), on thread-block clusters (BNTRAIN_FUSED_CLUSTER), as a BN+plain pair (--pair; in one launch with
#      BNTRAIN_FUSED_PAIR=1) and with the small-GEMM kernels (BNTRAIN_SMALL_GEMM=1), the wide
#      one with tf32 and bf16 GEMMs, and each precision with tuned GEMMs (BNTRAIN_GEMM_TUNE=1),
#      and graphs with weight gradients on a second stream (BNTRAIN_BACKWARD_STREAMS=1), and
#      the seed's fused, staged, paired and graph steps on every batch (--all-batches);
#      part "blocks" (first): the seed's fused step in blocks of 256, 512 and 1024 threads
#      (BNTRAIN_FUSED_THREADS) and in blocks of 512 on the 64-register kernel
#      (BNTRAIN_FUSED_512_KERNEL=0), and the study fused, in blocks of 1024, and with the
#      evaluation stream too;
#   4. the full `reproduce` study, timed, with fused steps (two launches a step), with the
#      defaults (fused, paired), in blocks of 1024 threads and with the evaluation stream
#      too (part "blocks"), with evaluation points on a stream of their own
#      (BNTRAIN_EVAL_STREAM=1), clusters (paired, then with that stream), staged fused
#      steps, staged and paired, fused with tuned GEMMs, then graphs (REPRODUCE=0 skips
#      them; REPRODUCE_VARIANTS="default fused …" runs only those named);
#   5. compare-peers.sh: our PyTorch and JAX versions of the step on the same GPU, same
#      call, same MNIST batches (RUN_PEERS=0 skips it; PEER_VARIANTS=fused,replicated,…
#      names bntrain's step variants, by default every one that works);
#   6. profile: Nsight Compute's duration of every kernel of a few eager steps (seed, wide),
#      and the fused kernel's stall reasons, unstaged and staged (skipped without ncu);
#   7. optionally a peer anchor (python3 torch_anchor.py);
#   part "replicated" (after the tests): the one-barrier kernel (BNTRAIN_FUSED_REPLICATED,
#   cuda/fused_replicated.cuh) beside the grid kernel in the same call: the seed's step in
#   blocks of 512 and 256 (traced), on every batch, the BN+plain pair (two launches) beside
#   the grid pair in one launch, a training run, and the study beside the defaults'; then on
#   50 blocks a network (BNTRAIN_FUSED_REPLICATED_GRID=50: two layer-0 neurons a block, so
#   that the study's two launches may run side by side on 100 SMs), alone, paired and in the
#   study; and the study with the evaluation points on a stream of their own, either way;
#   part "points" (after "replicated"): the study's evaluation points alone, each begun and
#   finished at once (bench --pair --points), with and without a stream of their own;
#   part "baseline" (after "bench", when the bundle has bntrain-base.xz: BASELINE=<commit>
#   scripts/gpu-bundle.sh): that commit's build beside this one in the same call, the seed's
#   fused step alone (traced) and paired in one launch, and the study's defaults;
# then prints each option against the same run without it (the decisions on the defaults;
# a variant that fell back is left out of them and counts as a failure), and a summary
# table last.
#
#   bash gpu-check.sh [BUNDLE_DIR] [PATH/TO/torch_anchor.py]
# BUNDLE_DIR defaults to the directory of this script when it holds `bntrain`, else
# ./gpu-bundle. STEPS (default 10000) shortens the training runs. BUDGET (default 420)
# is the seconds the whole script may take: give the device call ~60 s more (it is limited
# to 600 s, and the session's device time to ~900 s with the machine's start, so that a
# rerun still fits); the summary must print before the limit cuts the output. PARTS (default
# "tests replicated points train blocks bench baseline reproduce peers profile"; also "source": the fused kernel's warp
# stalls by instruction; "jit": the binary's machine code against the driver's compilation;
# "sanitize": Compute Sanitizer on the three fused kernels, which otherwise runs only on those
# whose smoke test or tests failed; "point-profile": every kernel of an evaluation point
# timed by Nsight Compute; "intervals": training runs with a point every 50, 250 and 10000
# steps, what a point costs beside the steps, each with its device timeline, and the study
# with the timeline: each network's rows for the comparison)
# picks the steps after the smoke tests, for a rerun of a few. When
# OUT is set (a device call), the rows come back in $OUT/summary.txt as they are made, the
# decisions in $OUT/decisions.txt, and the logs and the reproduce reports (without
# checkpoints and SVGs) in $OUT/gpu-check.tar.gz, renewed after each part.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ $# -ge 1 ]]; then bundle="$1"; elif [[ -x "$here/bntrain" ]]; then bundle="$here"; else bundle="./gpu-bundle"; fi
anchor="${2:-}"
steps="${STEPS:-10000}"
budget="${BUDGET:-420}"
bin="$bundle/bntrain"
[[ -x "$bin" ]] || { echo "gpu-check: $bin not found (build the bundle with scripts/gpu-bundle.sh)" >&2; exit 2; }
# Every command (tests that train on real MNIST, train, bench, reproduce, the peers) reads
# the bundle's copy of MNIST.
export BNTRAIN_DATA="$bundle/data"
logs="$(mktemp -d)"
parts=" ${PARTS:-tests replicated points train blocks bench baseline reproduce peers profile} "
part() { [[ "$parts" == *" $1 "* ]]; }
summary=()
failed=0
# Each row also goes to $OUT/summary.txt as it is made: a call cut short still returns them.
row() {
    summary+=("$(printf '%-40s %s' "$1" "$2")")
    [[ -n "${OUT:-}" ]] && printf '%-40s %s\n' "$1" "$2" >> "$OUT/summary.txt"
    return 0
}
# The logs and reports so far into $OUT/gpu-check.tar.gz (after each part: a call cut short
# still returns what ran), without checkpoints and SVGs, which would take it past the
# 16 MiB a returned file may have.
save_logs() {
    [[ -n "${OUT:-}" ]] || return 0
    tar czf "$OUT/gpu-check.tar.gz.tmp" --exclude='*.safetensors' --exclude='*.svg' --exclude='*.ncu-rep' -C "$logs" . && mv "$OUT/gpu-check.tar.gz.tmp" "$OUT/gpu-check.tar.gz"
}
# t ← min(WANTED, what is left of BUDGET less 30 s: 20 for the summary, 10 for `timeout -k`
# to kill a command that ignores its SIGTERM, such as train or reproduce blocked on a hung
# kernel); false (and a row saying what was skipped) when under MIN seconds are left.
limit() { # WANTED MIN NAME
    local left=$((budget - SECONDS - 30))
    if (( left < $2 )); then row "$3" "SKIPPED: ${left}s of BUDGET=${budget}s left"; return 1; fi
    t=$(( $1 < left ? $1 : left ))
}
# A Python expression over `r`, the last line of a log that parses as a JSON object ({} if
# none).
json_eval() { python3 - "$1" "$2" <<'PY'
import json, sys
r = {}
for line in open(sys.argv[1], errors="replace"):
    try:
        value = json.loads(line)
    except ValueError:
        continue
    if isinstance(value, dict):
        r = value
print(eval(sys.argv[2]))
PY
}
# One field of that object, floats to four places ("?" if missing).
json_field() { json_eval "$1" "(lambda v: '?' if v is None else (f'{v:.4f}' if isinstance(v, float) else v))(r.get('$2'))"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(nvidia-smi unavailable)"

# First `bntrain info`: it opens the GPU and loads every kernel module, timed. The binary
# carries sm_90 machine code (build.rs), so this should take seconds; a GPU it has no code
# for (a notice says so) has the driver compile the PTX here (29 s on an H100 before), not
# inside the smoke tests' short limits, and the cache keeps that for the commands after.
export CUDA_CACHE_MAXSIZE=1073741824
echo "== bntrain info (CUDA_CACHE_DISABLE=${CUDA_CACHE_DISABLE:-unset}; the kernel modules load here)"
info_start=$SECONDS
timeout -k 10 240 "$bin" info 2>&1 | tee "$logs/info.log"
how="machine code"; grep -q "notice: this build has no machine code" "$logs/info.log" && how="PTX compiled by the driver"
row "bntrain info (kernels loaded)" "$((SECONDS - info_start)) s, $how: $(grep -m1 '^cuda:' "$logs/info.log" || echo 'no cuda line')"

# A smoke test: `train` for 300 steps with the environment given (VAR=VALUE …), whose device
# name must contain WANT; its row says so, and it fails (so that every later run of that
# kernel is skipped) if not. A broken kernel costs seconds, not the call.
smoke() { # NAME WANT VAR=VALUE...
    local name="$1" want="$2" log="$logs/$1-smoke.log"; shift 2
    echo "== smoke: $* bntrain train --device cuda --steps 300"
    env "$@" timeout -k 10 45 "$bin" train --device cuda --steps 300 --eval-every 100 --json 2>&1 | tee "$log"
    if [[ ${PIPESTATUS[0]} -eq 0 && "$(json_field "$log" device)" == *"$want"* ]]; then
        row "$name smoke (300 steps)" "test accuracy $(json_field "$log" test_accuracy), $(json_field "$log" device)"
    else
        row "$name smoke (300 steps)" "FAIL: every $name run below is skipped"; failed=1; return 1
    fi
}
# The fused kernel first (it fails or hangs: its grid barrier traps after seconds); the
# cluster kernels (sm_90) too: a fault in them would leave the process's CUDA context
# unusable, so their tests also run in a process of their own below.
fused_ok=1 cluster_ok=1 replicated_ok=1 failed_tests=""
smoke fused "(fused steps)" BNTRAIN_CUDA_STEP=fused || fused_ok=0
smoke cluster "clusters of" BNTRAIN_FUSED_CLUSTER=1 BNTRAIN_CUDA_STEP=fused || cluster_ok=0
# (The one-barrier kernel's only where its tests or its part run.)
if part tests || part replicated; then
    smoke replicated "one barrier a step" BNTRAIN_FUSED_REPLICATED=1 BNTRAIN_CUDA_STEP=fused || replicated_ok=0
fi

# The test executables: the kernels; the unfused training tests; the fused kernels' tests, the
# cluster kernels' and the one-barrier kernel's each in a process of their own (a trap in a
# kernel leaves its process's CUDA context unusable), each skipped where its smoke test failed.
for test in gpu_kernels gpu_training gpu_training:fused gpu_training:cluster gpu_training:replicated; do
    part tests || continue
    exe="${test%%:*}" filter=() skip=()
    case "$test" in
        gpu_training) skip=(--skip fused --skip cluster --skip replicated) ;;
        *:fused) filter=(fused); skip=(--skip cluster --skip replicated) ;;
        *:cluster) filter=(cluster) ;;
        *:replicated) filter=(replicated) ;;
    esac
    if [[ ($test == *:fused && $fused_ok == 0) || ($test == *:cluster && $cluster_ok == 0) || ($test == *:replicated && $replicated_ok == 0) ]]; then
        row "$test" "SKIPPED: its smoke test failed"; continue
    fi
    echo "== $test"
    if [[ ! -x "$bundle/$exe" ]]; then row "$test" "MISSING"; failed=1; continue; fi
    limit 240 30 "$test" || { failed=1; continue; }
    log="$logs/${test/:/-}.log"
    BNTRAIN_REQUIRE_GPU=1 BNTRAIN_REQUIRE_CLUSTERS=1 BNTRAIN_REQUIRE_REPLICATED=1 timeout -k 10 "$t" "$bundle/$exe" "${filter[@]}" --test-threads=4 "${skip[@]}" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    result="$(grep -E '^test result:' "$log" | tail -n 1 | sed 's/^test result: //; s/; finished.*//')"
    if [[ $status -eq 0 ]]; then row "$test" "PASS ${result}"; else row "$test" "FAIL (exit $status) ${result}"; failed=1; failed_tests+=" $test "; fi
done

# Compute Sanitizer on each fused kernel whose smoke test or tests failed (on all three with
# part "sanitize"), so that the call that finds a fault also says where it is: memcheck
# (out-of-bounds or misaligned accesses to global, local or shared memory; hardware
# exceptions), racecheck (hazards between a block's threads on shared memory), synccheck
# (barriers misused), each on a short `train` in a process of its own, instrumenting only
# the kernels whose names hold "fused" (the others run at full speed). The fat binaries carry
# line information (-lineinfo), so a report names the .cu line. A clean run costs some
# seconds a tool; a failure's first report and the tool's summary make the row, and end that
# kernel's runs (the first report is what the next call needs). A run whose device name lacks
# the kernel's (it fell back to another way of stepping) checked nothing and says so. The
# whole step takes at most SANITIZE_SECONDS (default 150), 60 s a run, so that the parts
# after it keep their share of BUDGET.
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
sanitize_until=$((SECONDS + ${SANITIZE_SECONDS:-150}))
sanitize() { # NAME WANT VAR=VALUE...
    local name="$1" want="$2" tool log status totals first at device; shift 2
    if [[ -z "$sanitizer" ]]; then row "sanitize $name" "SKIPPED: compute-sanitizer not found"; return; fi
    for tool in memcheck racecheck synccheck; do
        if (( sanitize_until - SECONDS < 20 )); then row "sanitize $name ($tool)" "SKIPPED: SANITIZE_SECONDS spent"; return; fi
        limit $(( sanitize_until - SECONDS < 60 ? sanitize_until - SECONDS : 60 )) 20 "sanitize $name ($tool)" || return
        log="$logs/sanitize-$name-$tool.log"
        echo "== $* compute-sanitizer --tool $tool --kernel-name kns=fused bntrain train --device cuda --steps 60"
        env "$@" timeout -k 10 "$t" "$sanitizer" --tool "$tool" --kernel-name kns=fused --error-exitcode 86 --print-limit 20 \
            "$bin" train --device cuda --steps 60 --eval-every 60 --json > "$log" 2>&1
        status=$?
        tail -n 40 "$log"
        totals="$(grep -m1 -E '^========= (ERROR|RACECHECK) SUMMARY' "$log" | sed 's/^========= //')"
        first="$(grep -E '^========= [A-Z]' "$log" | grep -v -E 'SUMMARY|COMPUTE-SANITIZER' | head -n 1 | sed 's/^========= //')"
        at="$(grep -m1 -E '^=========  +at ' "$log" | sed 's/^=========  *//')"
        device="$(json_field "$log" device)"
        if [[ $status -eq 0 && "$device" != *"$want"* ]]; then
            row "sanitize $name ($tool)" "FELL BACK (nothing checked): $device"; failed=1; return
        elif [[ $status -eq 0 ]]; then
            row "sanitize $name ($tool)" "clean: ${totals:-no summary}; $device"
        else
            row "sanitize $name ($tool)" "exit $status: ${totals:-no summary}; ${first:-no report}${at:+ $at}; $device"; failed=1; return
        fi
    done
}
for family in fused fused64 cluster replicated; do
    case $family in
        fused) ok=$fused_ok want="(fused steps" vars=(BNTRAIN_CUDA_STEP=fused) ;;
        # Blocks of 512 on the 64-register kernel (the default's twin, and the code of blocks of
        # 256 and 1024).
        fused64) ok=$fused_ok want="64 registers a thread" vars=(BNTRAIN_CUDA_STEP=fused BNTRAIN_FUSED_512_KERNEL=0) ;;
        cluster) ok=$cluster_ok want="clusters of" vars=(BNTRAIN_FUSED_CLUSTER=1 BNTRAIN_CUDA_STEP=fused) ;;
        replicated) ok=$replicated_ok want="one barrier a step" vars=(BNTRAIN_FUSED_REPLICATED=1 BNTRAIN_CUDA_STEP=fused) ;;
    esac
    [[ $family == replicated ]] && ! part tests && ! part replicated && ! part sanitize && continue
    if part sanitize || [[ $ok == 0 || $failed_tests == *":${family%64} "* ]]; then sanitize "$family" "$want" "${vars[@]}"; fi
done

save_logs


# One `train --device cuda --json` run as a row: BNTRAIN_CUDA_STEP=STEP, STEPS steps and the
# further arguments; its test accuracy, seconds and µs a step (evaluations included). A run
# that failed, or fell back to another way of stepping (it trained, but not as asked), is a
# failure, and its log is set aside so that the decisions below leave it out.
train_row() { # NAME LOG EXE STEP(graph|fused) STEPS [ARGS...]
    local name="$1" log="$2" exe="$3" step="$4" n="$5"; shift 5
    echo "== BNTRAIN_CUDA_STEP=$step bntrain train --device cuda --steps $n $*"
    limit 120 15 "$name" || { failed=1; return; }
    BNTRAIN_CUDA_STEP=$step timeout -k 10 "$t" "$exe" train --device cuda --steps "$n" "$@" --json 2>&1 | tee "$log"
    if [[ ${PIPESTATUS[0]} -ne 0 ]]; then
        row "$name" "FAIL"; failed=1; mv "$log" "$log.failed"; return
    fi
    local acc secs us device verdict="" want="(cuda graph"
    acc="$(json_field "$log" test_accuracy)"
    secs="$(json_field "$log" seconds)"
    us="$(python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]) * 1e6:.1f}')" "$secs" "$n" 2>/dev/null || echo '?')"
    device="$(json_field "$log" device)"
    [[ $step == fused ]] && want="(fused steps"
    [[ ${BNTRAIN_FUSED_REPLICATED:-0} != 0 ]] && want="(fused steps, one barrier a step"
    if [[ "$device" != *"$want"* ]]; then verdict="FELL BACK: "; failed=1; mv "$log" "$log.fell-back"; fi
    row "$name" "${verdict}test accuracy $acc, $secs s ($us µs/step incl. evaluation), $device"
}
# The one-barrier kernel's accuracy (part "replicated"): the same run as the fused f32 row below.
if part replicated && [[ $fused_ok == 0 || $replicated_ok == 0 ]]; then
    row "train $steps steps (BN, fused, f32, one barrier a step)" "SKIPPED: a smoke test failed"
elif part replicated; then
    BNTRAIN_FUSED_REPLICATED=512 train_row "train $steps steps (BN, fused, f32, one barrier a step)" "$logs/train-replicated-f32.log" "$bin" fused "$steps" --precision f32
    # Its baseline, the grid kernel's run, where part "train" will not make it.
    part train || train_row "train $steps steps (BN, fused, f32)" "$logs/train-fused-f32.log" "$bin" fused "$steps" --precision f32
fi
for run in graph:f32 fused:f32 graph:tf32 graph:bf16; do
    part train || continue
    step="${run%%:*}" precision="${run##*:}"
    [[ $step == fused && $fused_ok == 0 ]] && continue
    train_row "train $steps steps (BN, $step, $precision)" "$logs/train-$step-$precision.log" "$bin" "$step" "$steps" --precision "$precision"
done

# A row of a log's device timeline: ROWS, a Python expression over `r` (json_eval) giving
# the list of rows.
timeline_row() { # NAME LOG ROWS
    row "$1" "$(json_eval "$2" "'; '.join(f\"{s['what']}: {s['count']}× median {s['median_us']:.2f} µs, total {s['total_us'] / 1e3:.1f} ms\" for s in ($3)) or 'no timeline'")"
}

# Part "intervals" (not in the default PARTS): what an evaluation point costs a run beside
# its steps. The same 10000 fused steps with a point every 50 (the study's interval), 250
# and 10000 steps: the difference per point, against bench --points' latency and the
# point profile's GPU time, says whether a point's time hides behind the queued steps or
# adds to it (and by how much more than its kernels); each run's device timeline says
# where. Also whether Nsight Systems is there.
if part intervals; then
    # With BNTRAIN_TIMELINE=1: device events around every run and point, a row each of
    # where the time went (runs' µs a step, right after a point or not; points; the gaps).
    # Its events (four a point) add a little host time: these runs' seconds are not the
    # twenty-fifth session's, taken without it.
    [[ $fused_ok == 1 ]] && for every in 50 250 10000; do
        log="$logs/train-interval-$every.log"
        BNTRAIN_TIMELINE=1 train_row "train 10000 steps (BN, fused, f32), a point every $every" "$log" "$bin" fused 10000 --precision f32 --eval-every "$every"
        [[ -f "$log" ]] && timeline_row "  timeline, a point every $every" "$log" "r.get('timeline') or []"
    done
    # The study with the defaults and the timeline: where its comparison's seconds go
    # beyond the pair steps and the points (each network's rows; the pair's runs are on
    # both, the points on each).
    if [[ $fused_ok == 1 ]] && limit 90 30 "reproduce with the timeline"; then
        echo "== BNTRAIN_TIMELINE=1 bntrain reproduce --device cuda (the full study, the defaults)"
        log="$logs/reproduce-timeline.log"
        BNTRAIN_TIMELINE=1 timeout -k 10 "$t" "$bin" --device cuda reproduce --out "$logs/runs" --name gpu-timeline --json 2>&1 | tee "$log"
        if [[ ${PIPESTATUS[0]} -eq 0 ]]; then
            comparison="$(python3 -c "import json, sys; print(f\"{json.load(open(sys.argv[1]))['timings']['comparison_s']:.2f}\")" "$logs/runs/gpu-timeline/metrics.json" 2>/dev/null || echo '?')"
            device="$(json_field "$log" device)"
            row "reproduce, timeline on" "comparison ${comparison} s; device $device"
            [[ "$device" == *"two networks a launch"* ]] || { row "reproduce, timeline on" "FELL BACK: not a paired launch"; failed=1; }
            for net in BN plain; do
                timeline_row "  comparison timeline, $net" "$log" "(r.get('comparison_timeline') or {}).get('$net') or []"
            done
        else
            row "reproduce, timeline on" "FAIL"; failed=1
        fi
    fi
    row "nsys" "$(command -v nsys || ls -d /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -n 1 || true)"
    save_logs
fi

# A bench takes seconds (20 warm-up steps, a calibration of a few hundredths of a second,
# then 7 runs of ~0.3 s); the cap only keeps a hang from eating the call.
# The log of one bench row (bench's arguments).
# With bench_build set (as `bench_build=base bench …`; part "baseline"), the row and its
# log are the baseline build's (base) or this build's beside it (here).
bench_log() {
    echo "$logs/bench-$1-$2-$3-small${4:-0}-stage${5:-0}-pair${6:-0}-tune${7:-0}-cluster${8:-0}-backward${9:-0}-threads${10:-512}-all${11:-0}-replicated${12:-0}${13:+-grid${13}}${14:+-k512${14}}${bench_build:+-$bench_build}.log"
}
bench_part=bench
bench() { # CONFIG STEP(graph|eager|fused) PRECISION [SMALL_GEMM(0|1)] [FUSED_STAGE(0|1)] [PAIR(0|1|2)] [TUNE(0|1)] [CLUSTER(0|1|8|16)] [BACKWARD(0|1)] [THREADS(256|512|1024)] [ALL(0|1)] [REPLICATED(0|256|512)] [GRID] [KERNEL_512(0|1)]
    # PAIR: 1 times the BN and the plain network in lockstep (--pair), 2 also in one launch
    # (BNTRAIN_FUSED_PAIR=1). TUNE: 1 sets BNTRAIN_GEMM_TUNE=1. CLUSTER: BNTRAIN_FUSED_CLUSTER.
    # BACKWARD: 1 sets BNTRAIN_BACKWARD_STREAMS=1. THREADS: BNTRAIN_FUSED_THREADS. ALL: 1
    # passes --all-batches (every batch of MNIST's training set, as training streams them,
    # where twelve batches stay in L2). REPLICATED: BNTRAIN_FUSED_REPLICATED (the one-barrier
    # kernel in blocks of that many threads). GRID: BNTRAIN_FUSED_REPLICATED_GRID (at most that
    # many blocks for it; unset: no cap). KERNEL_512: BNTRAIN_FUSED_512_KERNEL (0: blocks of 512
    # on the kernel bounded by 1024, 64 registers a thread). The part that runs it: $bench_part.
    local small="${4:-0}" stage="${5:-0}" pair="${6:-0}" tune="${7:-0}" cluster="${8:-0}" backward="${9:-0}" threads="${10:-512}" all="${11:-0}" replicated="${12:-0}" grid="${13:-}" k512="${14:-1}"
    local log; log="$(bench_log "$@")"
    local name="bench $1 ($2, $3"
    [[ $small == 1 ]] && name+=", small-GEMM kernels"
    [[ $stage == 1 ]] && name+=", staged"
    [[ $pair == 1 ]] && name+=", BN+plain pair"
    [[ $pair == 2 ]] && name+=", BN+plain in one launch"
    [[ $tune == 1 ]] && name+=", tuned GEMMs"
    [[ $cluster == 1 ]] && name+=", clusters"
    [[ $cluster == 8 || $cluster == 16 ]] && name+=", clusters of $cluster"
    [[ $backward == 1 ]] && name+=", dW on a 2nd stream"
    [[ $threads != 512 ]] && name+=", $threads threads a block"
    [[ $k512 == 0 ]] && name+=", 64-register kernel"
    [[ $all == 1 ]] && name+=", all batches"
    [[ $replicated != 0 ]] && name+=", one barrier a step, $replicated threads"
    [[ -n $grid ]] && name+=", at most $grid blocks"
    local exe="$bin"
    [[ ${bench_build:-} == base ]] && name+=", baseline build" exe="$base_bin"
    [[ ${bench_build:-} == here ]] && name+=", beside the baseline"
    name+=")"
    local pair_flag=() one_launch=0; [[ $pair != 0 ]] && pair_flag=(--pair); [[ $pair == 2 ]] && one_launch=1
    [[ $all == 1 ]] && pair_flag+=(--all-batches)
    # One network's fused steps: also timed phase by phase (bench --trace, one more launch;
    # the grid kernels only).
    [[ $2 == fused && $pair == 0 && $cluster == 0 ]] && pair_flag+=(--trace)
    part "$bench_part" || return
    # Said, not silent: a row the table would otherwise miss.
    if [[ $cluster != 0 && $cluster_ok == 0 ]]; then row "$name" "SKIPPED: the cluster smoke test failed"; return; fi
    if [[ $2 == fused && $fused_ok == 0 ]]; then row "$name" "SKIPPED: the fused smoke test failed"; return; fi
    if [[ $replicated != 0 && $replicated_ok == 0 ]]; then row "$name" "SKIPPED: the replicated smoke test failed"; return; fi
    echo "== BNTRAIN_SMALL_GEMM=$small BNTRAIN_FUSED_STAGE=$stage BNTRAIN_FUSED_PAIR=$one_launch BNTRAIN_GEMM_TUNE=$tune BNTRAIN_FUSED_CLUSTER=$cluster BNTRAIN_BACKWARD_STREAMS=$backward BNTRAIN_FUSED_THREADS=$threads BNTRAIN_FUSED_512_KERNEL=$k512 BNTRAIN_FUSED_REPLICATED=$replicated BNTRAIN_FUSED_REPLICATED_GRID=$grid BNTRAIN_CUDA_STEP=$2 bntrain bench --device cuda --config $1 --precision $3 ${pair_flag[*]}"
    limit 60 10 "$name" || { failed=1; return; }
    BNTRAIN_FUSED_REPLICATED_GRID=$grid BNTRAIN_FUSED_REPLICATED=$replicated BNTRAIN_SMALL_GEMM=$small BNTRAIN_FUSED_STAGE=$stage BNTRAIN_FUSED_PAIR=$one_launch BNTRAIN_GEMM_TUNE=$tune BNTRAIN_FUSED_CLUSTER=$cluster BNTRAIN_BACKWARD_STREAMS=$backward BNTRAIN_FUSED_THREADS=$threads BNTRAIN_FUSED_512_KERNEL=$k512 BNTRAIN_CUDA_STEP=$2 timeout -k 10 "$t" "$exe" --device cuda bench --config "$1" --precision "$3" "${pair_flag[@]}" --json 2>&1 | tee "$log"
    if [[ ${PIPESTATUS[0]} -eq 0 ]]; then
        local device want; device="$(json_field "$log" device)"
        local tuned=""
        # How many tuned shapes kept a cublasLt candidate over cuBLAS's own kernel.
        [[ $tune == 1 ]] && tuned="; $(json_eval "$log" "f\"{sum(t['chosen'] > 0 for t in r.get('tuned_gemms') or [])} of {len(r.get('tuned_gemms') or [])} tuned shapes on cublasLt\"")"
        local phases=""
        # The traced phases' walls (+ barriers), µs: where a fused step's time goes.
        [[ " ${pair_flag[*]} " == *" --trace "* ]] && phases="; phases $(json_eval "$log" "' + '.join(f\"{p['wall_us']:.1f}+{p['barrier_us']:.1f}\" for p in r.get('phases') or []) + f\" = {sum(p['wall_us'] + p['barrier_us'] for p in r.get('phases') or []):.1f} µs\" if r.get('phases') else 'not traced'")"
        # A variant that fell back still times something, but not what was asked: a failure,
        # and its log is set aside so that the decisions below do not take it for the option.
        local fell_back=0
        case "$2" in graph) want="(cuda graph" ;; eager) want="(eager launches" ;; fused) want="(fused steps" ;; esac
        [[ $stage == 1 ]] && want="(fused steps, staged in shared memory"
        [[ $cluster != 0 ]] && want="(fused steps, clusters of"
        [[ $cluster == 8 || $cluster == 16 ]] && want+=" $cluster blocks"
        [[ $2 == fused && $threads != 512 && $pair != 2 ]] && want="(fused steps, $threads threads a block"
        [[ $2 == fused && $threads == 512 && $k512 == 0 ]] && want="(fused steps, 512 threads a block, 64 registers a thread"
        # (The default's kernel: a silent fall back to the 64-register one would still match.)
        [[ $2 == fused && $k512 == 1 && "$device" == *"64 registers a thread"* ]] && fell_back=1
        # (A baseline build may name its block sizes as builds before 512 became the default did.)
        [[ $2 == fused && ${bench_build:-} == base && $stage == 0 && $cluster == 0 && $replicated == 0 ]] && want="(fused steps"
        [[ $replicated != 0 ]] && want="(fused steps, one barrier a step, $replicated threads a block"
        [[ $replicated != 0 && -n $grid ]] && want+=", $grid blocks"
        [[ $pair == 2 && "$device" != *", two networks a launch"* ]] && fell_back=1
        [[ $tune == 1 && "$device" != *"GEMMs tuned"* ]] && fell_back=1
        [[ $backward == 1 && "$device" != *"weight gradients on a second stream"* ]] && fell_back=1
        [[ $all == 1 && "$(json_eval "$log" "r.get('batches', 0) > 12")" != True ]] && fell_back=1
        if [[ "$device" != *"$want"* || "$device" == *"unavailable"* || "$device" == *"failed"* ]]; then fell_back=1; fi
        local verdict="" us; us="$(json_field "$log" us_per_step)"
        if [[ $fell_back == 1 ]]; then verdict="FELL BACK: "; failed=1; mv "$log" "$log.fell-back"; fi
        row "$name" "$verdict$us µs/step (median), device: $device$tuned$phases"
    else
        row "$name" "FAIL"; failed=1
        [[ -f "$log" ]] && mv "$log" "$log.failed"
    fi
}
save_logs

# Part "replicated": the one-barrier kernel (cuda/fused_replicated.cuh) beside the grid kernel
# (a short call, PARTS="tests replicated", runs just these after the tests): the seed
# step in blocks of 512 and 256 (the grid kernel's rows as this part's baseline, the default
# 512 and 256), every batch, and the BN+plain pair (the one-barrier kernel has no pair kernel:
# two launches, as the study then runs) beside the grid pair in one launch (the default).
# The grid kernel's rows are made here only (parts "blocks" and "bench" skip them when this
# part runs), and only when the one-barrier kernel's smoke test passed.
bench_part=replicated
if [[ $replicated_ok == 1 ]]; then
    bench seed fused f32
    bench seed fused f32 0 0 0 0 0 0 256
    bench seed fused f32 0 0 2
fi
bench seed fused f32 0 0 0 0 0 0 512 0 512
bench seed fused f32 0 0 0 0 0 0 512 0 256
bench seed fused f32 0 0 0 0 0 0 512 1 512
bench seed fused f32 0 0 1 0 0 0 512 0 512
# On 50 blocks, two layer-0 neurons each (their pixels read twice a block): the pair's two
# launches may run side by side on 100 of an H100's or H200's 132 SMs, leaving 32 for the
# evaluations on a stream of their own (66 blocks would take them all, no faster: 34 of them
# would own two neurons).
bench seed fused f32 0 0 0 0 0 0 512 0 512 50
bench seed fused f32 0 0 1 0 0 0 512 0 512 50
bench_part=bench
# Part "points": the study's evaluation points alone (`bench --pair --points`: the whole test
# split with batch statistics and the probe, each point begun and finished at once), with the
# defaults and with points on a stream of their own: what the comparison's 800 points cost
# beside its steps. The steps run as CUDA graphs, whatever became of the fused kernels' smoke
# tests: a point runs the same kernels either way.
for streams in 0 1; do
    part points || break
    name="evaluation points (BN+plain, test split$([[ $streams == 1 ]] && echo ", own stream"))"
    limit 60 10 "$name" || { failed=1; break; }
    log="$logs/points-streams$streams.log"
    echo "== BNTRAIN_EVAL_STREAM=$streams BNTRAIN_CUDA_STEP=graph bntrain bench --device cuda --pair --points"
    BNTRAIN_EVAL_STREAM=$streams BNTRAIN_CUDA_STEP=graph timeout -k 10 "$t" "$bin" --device cuda bench --config seed --pair --points --runs 1 --seconds 0.05 --json 2>&1 | tee "$log"
    if [[ ${PIPESTATUS[0]} -eq 0 ]]; then
        row "$name" "$(json_eval "$log" "' / '.join(f'{u:.1f}' for u in r.get('us_per_point') or []) + f\" µs a point (BN / plain) on {r.get('test_examples')} images; steps {r.get('us_per_step', 0):.2f} µs; {r.get('device')}\"")"
    else
        row "$name" "FAIL"; failed=1
    fi
done
save_logs
# Part "blocks": the unstaged fused kernel in blocks of 256, 512 and 1024 threads
# (BNTRAIN_FUSED_THREADS; more warps an SM wait on L2 for a neuron's rows), then the study
# with the larger blocks; a short call can run just these (PARTS="tests blocks").
bench_part=blocks
for threads in 256 512 1024; do
    # (256 and 512 were timed by part "replicated" when it ran, beside the one-barrier kernel.)
    [[ $threads != 1024 ]] && part replicated && [[ $replicated_ok == 1 ]] && continue
    bench seed fused f32 0 0 0 0 0 0 "$threads"
done
# Blocks of 512 on the kernel bounded by blocks of 1024 (64 registers a thread), against the
# default's kernel bounded by 512 (BNTRAIN_FUSED_512_KERNEL=0).
bench seed fused f32 0 0 0 0 0 0 512 0 0 "" 0
bench_part=bench
for config in seed wide; do
    for step in fused graph eager; do
        # (The seed's fused row was timed by part "blocks" when it ran.)
        [[ $config == seed && $step == fused ]] && { part blocks || { part replicated && [[ $replicated_ok == 1 ]]; }; } && continue
        bench "$config" "$step" f32
    done
done
# The fused kernel with layer inputs and weight rows in shared memory (BNTRAIN_FUSED_STAGE=1).
bench seed fused f32 0 1
# A thread-block cluster per network (BNTRAIN_FUSED_CLUSTER: the largest that fits, then 8
# blocks), alone, as a BN+plain pair, and the pair in one launch.
bench seed fused f32 0 0 0 0 1
bench seed fused f32 0 0 0 0 8
bench seed fused f32 0 0 1 0 1
bench seed fused f32 0 0 2 0 1
# The BN and the plain network in lockstep, as reproduce's comparison trains them: about
# twice one network's time if their launches (one stream each) run one after the other,
# about once if they overlap on the GPU.
bench seed fused f32 0 0 1
bench seed fused f32 0 1 1
bench seed graph f32 0 0 1
# And in one launch (BNTRAIN_FUSED_PAIR=1, cuda/fused_step.cu's pair kernels; timed by part
# "replicated" when it ran).
part replicated && [[ $replicated_ok == 1 ]] || bench seed fused f32 0 0 2
bench seed fused f32 0 1 2
bench wide graph tf32
bench wide graph bf16
# Each large GEMM shape on the fastest of cuBLAS's kernel and cublasLt's candidates
# (BNTRAIN_GEMM_TUNE=1); the log lists every candidate's time.
bench wide graph f32 0 0 0 1
bench wide graph tf32 0 0 0 1
bench wide graph bf16 0 0 0 1
bench wide eager f32 0 0 0 1
# Each layer's weight gradient on a second stream beside the rest of the backward
# (BNTRAIN_BACKWARD_STREAMS=1): the wide network's 1024-square products fill half the SMs.
bench wide graph f32 0 0 0 0 0 1
bench wide graph f32 0 0 0 1 0 1
bench wide graph tf32 0 0 0 0 0 1
bench seed graph f32 0 0 0 0 0 1
# The seed step's GEMMs on cuda/small_gemm.cu instead of cuBLAS (BNTRAIN_SMALL_GEMM=1).
bench seed graph f32 1
bench seed eager f32 1
# Every batch of the training set (--all-batches), as training and the study stream them:
# twelve batches (0.56 MB) stay in L2 between steps, the 47 MB set may not. The fused step
# alone, staged, and the study's pair in one launch; the graph step.
bench seed fused f32 0 0 0 0 0 0 512 1
bench seed fused f32 0 1 0 0 0 0 512 1
bench seed fused f32 0 0 2 0 0 0 512 1
bench seed graph f32 0 0 0 0 0 0 512 1

save_logs

# Part "jit" (not in the default PARTS): the kernels as the binary carries them (nvcc's ptxas
# made the sm_90 machine code from the PTX) against the driver's own compilation of the same
# PTX (CUDA_FORCE_PTX_JIT=1, how every build before the fat binaries ran): the first
# command's seconds, and the seed's fused step. The same ptxas version should give the same
# code and times. (With CUDA_CACHE_DISABLE=1 the forced bench compiles again, inside its
# limit.)
if part jit && [[ $fused_ok == 0 ]]; then
    row "jit: machine code against driver JIT" "SKIPPED: the fused smoke test failed"
elif part jit; then
    for code in "machine code" "driver JIT"; do
        force=(); [[ $code == "driver JIT" ]] && force=(CUDA_FORCE_PTX_JIT=1)
        limit 120 60 "jit: info and seed bench ($code)" || break
        echo "== ${force[*]} bntrain info; bntrain bench --config seed"
        info_start=$SECONDS
        if ! env "${force[@]}" timeout -k 10 "$t" "$bin" info > "$logs/info-${force[*]:-sass}.log" 2>&1; then
            row "seed fused step, kernels by $code" "FAIL: bntrain info did not finish in ${t} s"; failed=1; continue
        fi
        info_s=$((SECONDS - info_start))
        log="$logs/bench-seed-${force[*]:-sass}.log"
        limit 60 10 "jit: seed bench ($code)" || break
        env "${force[@]}" timeout -k 10 "$t" "$bin" --device cuda bench --config seed --json 2>&1 | tee "$log"
        row "seed fused step, kernels by $code" "$(json_field "$log" us_per_step) µs/step (median); info took $info_s s"
    done
    save_logs
fi

# Part "baseline": another commit's build (bntrain-base.xz, packed by gpu-bundle.sh with
# BASELINE=<commit>, a commit with `bench --trace`) beside this one, in the same call: the
# seed's fused step alone and the BN+plain pair in one launch (the study's default), each
# build's run right after the other's; fused training at auto's ceiling (batch 256, hidden
# layers 256 wide); and the study below (with part "reproduce"). Its modules load at its
# first command (`info`, timed): compiled there by the driver if it carries PTX alone. It is unpacked outside
# the logs, which every part archives.
base_bin=""
if part baseline && [[ -f "$bundle/bntrain-base.xz" ]] && limit 120 45 "baseline build (PTX compiled)"; then
    base_bin="$(mktemp -d)/bntrain-base"
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$bundle/bntrain-base.xz" "$base_bin" && chmod +x "$base_bin"
    echo "== the baseline build: $(cat "$bundle/baseline.txt" 2>/dev/null | cut -c1-100); bntrain-base info"
    info_start=$SECONDS
    if timeout -k 10 "$t" "$base_bin" info > "$logs/info-base.log" 2>&1; then
        row "baseline build (PTX compiled)" "$((SECONDS - info_start)) s: $(cut -c1-60 "$bundle/baseline.txt" 2>/dev/null)"
    else
        row "baseline build (PTX compiled)" "FAIL: no baseline rows"; failed=1; base_bin=""
    fi
fi
# `train` at auto's ceiling for fused steps, where every block's logits of the whole batch
# cost the most (B·classes·width multiply-adds: 655k a block at batch 256 and width 256,
# against 60k for the seed): its seconds (3000 steps, one evaluation).
ceiling_log() { echo "$logs/train-ceiling-$1.log"; }
ceiling() { # BUILD(base|here)
    local exe="$bin"; [[ $1 == base ]] && exe="$base_bin"
    train_row "train 3000 steps, batch 256, 256-wide (fused, $1)" "$(ceiling_log "$1")" "$exe" fused 3000 --eval-every 3000 --batch 256 --hidden 256,256
}
if [[ -n "$base_bin" ]]; then
    bench_part=baseline
    # This build's rows again, right after the baseline's (the bench part's own are minutes
    # older, on a GPU whose clocks move).
    # BASE_THREADS: the baseline build's block size for one network (default 512; 256 for a
    # build from before 512 became the default), so that each build runs its defaults.
    for build in base here; do
        bench_build=$build bench seed fused f32 0 0 0 0 0 0 "$([[ $build == base ]] && echo "${BASE_THREADS:-512}" || echo 512)"
    done
    for build in base here; do
        bench_build=$build bench seed fused f32 0 0 2 0 0 0 "$([[ $build == base ]] && echo "${BASE_THREADS:-512}" || echo 512)"
    done
    [[ $fused_ok == 1 ]] && for build in base here; do ceiling "$build"; done
    bench_part=bench
fi

save_logs

# The whole study (issue 4): its wall time on the GPU goes to docs/perf.md. REPRODUCE_VARIANTS
# (default: all of those below that their parts allow) picks some, for a short call.
for variant in ${REPRODUCE_VARIANTS:-fused default replicated replicated-streams replicated-50 replicated-50-streams baseline blocks1024 blocks1024-streams streams cluster cluster-streams staged paired tuned graph}; do
    # paired: staged fused steps, the two networks of the comparison in one launch; tuned:
    # fused steps, the evaluations' GEMMs tuned (BNTRAIN_GEMM_TUNE=1); streams: evaluation
    # points on a stream of their own beside the next steps (BNTRAIN_EVAL_STREAM=1).
    # blocks1024: fused steps in blocks of 1024 threads (BNTRAIN_FUSED_THREADS=1024; part
    # "blocks", as is the fused baseline when that part runs); default: the defaults (fused
    # steps, the two networks in one launch); graph: with the defaults' second stream for
    # the weight gradients (f32).
    # baseline: the defaults of the baseline build (part "baseline"), beside `default`.
    # replicated: fused steps on the one-barrier kernel (two launches a step; part
    # "replicated", which also runs `default` beside it when part "reproduce" does not);
    # replicated-50: at most 50 blocks a network, so that the two launches may run side by
    # side; -streams: the evaluation points on a stream of their own (on the SMs the launches
    # leave free).
    step=$variant stage=0 pairing=0 tune=0 clusters=0 streams=0 threads=512 replicated=0 grid="" gate=reproduce exe="$bin"
    [[ $variant == replicated* ]] && step=fused replicated=512 gate=replicated
    [[ $variant == replicated-50* ]] && grid=50
    [[ $variant == replicated* && $replicated_ok == 0 ]] && continue
    [[ $variant == default ]] && ! part reproduce && [[ $replicated_ok == 1 ]] && gate=replicated
    [[ $variant == baseline ]] && step=fused pairing=1 gate=baseline exe="$base_bin" threads="${BASE_THREADS:-512}"
    [[ $variant == baseline ]] && { [[ -n "$base_bin" ]] && part reproduce || continue; }
    [[ $variant == blocks* ]] && step=fused threads=1024 gate=blocks
    [[ $variant == fused ]] && part blocks && gate=blocks
    [[ $variant == default ]] && step=fused pairing=1
    # cluster: a thread-block cluster per network, both in one launch.
    [[ $variant == cluster* ]] && step=fused clusters=1 pairing=1
    [[ $variant == cluster* && $cluster_ok == 0 ]] && continue
    [[ $variant == *streams ]] && streams=1
    [[ $variant == streams ]] && step=fused
    [[ $variant == staged ]] && step=fused stage=1
    [[ $variant == paired ]] && step=fused stage=1 pairing=1
    [[ $variant == tuned ]] && step=fused tune=1
    name="reproduce (full, cuda, $variant)"
    [[ $variant == tuned ]] && name="reproduce (full, cuda, fused, evaluation GEMMs tuned, tuning included)"
    [[ $variant == baseline ]] && name="reproduce (full, cuda, the defaults, baseline build)"
    [[ $step == fused && $fused_ok == 0 ]] && continue
    [[ "${REPRODUCE:-1}" == 1 ]] && part "$gate" && limit 240 60 "$name" || continue
    echo "== BNTRAIN_FUSED_STAGE=$stage BNTRAIN_FUSED_PAIR=$pairing BNTRAIN_GEMM_TUNE=$tune BNTRAIN_FUSED_CLUSTER=$clusters BNTRAIN_EVAL_STREAM=$streams BNTRAIN_FUSED_THREADS=$threads BNTRAIN_FUSED_REPLICATED=$replicated BNTRAIN_FUSED_REPLICATED_GRID=$grid BNTRAIN_CUDA_STEP=$step bntrain reproduce --device cuda (the full study)"
    out_runs="$logs/runs"
    log="$logs/reproduce-$variant.log"
    start=$(date +%s.%N)
    BNTRAIN_FUSED_REPLICATED_GRID=$grid BNTRAIN_FUSED_REPLICATED=$replicated BNTRAIN_FUSED_STAGE=$stage BNTRAIN_FUSED_PAIR=$pairing BNTRAIN_GEMM_TUNE=$tune BNTRAIN_FUSED_CLUSTER=$clusters BNTRAIN_EVAL_STREAM=$streams BNTRAIN_FUSED_THREADS=$threads BNTRAIN_CUDA_STEP=$step timeout -k 10 "$t" "$exe" --device cuda reproduce --out "$out_runs" --name "gpu-$variant" --json 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    wall="$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")"
    if [[ $status -eq 0 ]]; then
        comparison="$(python3 -c "import json, sys; print(f\"{json.load(open(sys.argv[1]))['timings']['comparison_s']:.2f}\")" "$out_runs/gpu-$variant/metrics.json" 2>/dev/null || echo '?')"
        row "$name" "${wall} s wall (40000-step comparison ${comparison} s); BN $(json_field "$log" bn_final_accuracy), plain $(json_field "$log" plain_final_accuracy), 1-by-1 $(json_field "$log" one_by_one_population)/$(json_field "$log" one_by_one_batch); report in $out_runs/gpu-$variant"
        # A variant that fell back still runs, but not what was asked.
        device="$(json_field "$log" device)"
        fell_back=0
        case "$step" in fused) [[ "$device" != *"(fused steps"* ]] && fell_back=1 ;; graph) [[ "$device" != *"(cuda graph"* ]] && fell_back=1 ;; esac
        [[ $stage == 1 && "$device" != *"staged in shared memory"* ]] && fell_back=1
        [[ $pairing == 1 && "$device" != *", two networks a launch"* ]] && fell_back=1
        [[ $tune == 1 && "$device" != *"GEMMs tuned"* ]] && fell_back=1
        [[ $streams == 1 && "$device" != *"evaluations on a stream of their own"* ]] && fell_back=1
        [[ $clusters == 1 && "$device" != *"clusters of"* ]] && fell_back=1
        # (A baseline build names its block sizes its own way; a paired launch names none.)
        [[ $variant != baseline && $pairing == 0 && $threads != 512 && "$device" != *"$threads threads a block"* ]] && fell_back=1
        [[ $replicated != 0 && "$device" != *"one barrier a step"* ]] && fell_back=1
        [[ -n $grid && "$device" != *", $grid blocks"* ]] && fell_back=1
        if [[ $fell_back == 1 ]]; then
            row "$name" "FELL BACK (device: $device): not counted in the decisions"; failed=1
            mv "$out_runs/gpu-$variant/metrics.json" "$out_runs/gpu-$variant/metrics.json.fell-back"
        fi
    else
        row "$name" "FAIL (exit $status after ${wall} s)"; failed=1
        [[ -f "$out_runs/gpu-$variant/metrics.json" ]] && mv "$out_runs/gpu-$variant/metrics.json" "$out_runs/gpu-$variant/metrics.json.failed"
    fi
done

save_logs

# Our own PyTorch and JAX versions of the same step, same GPU, same call, same MNIST batches
# (issue 5). compare-peers.sh gets what is left of the budget.
if [[ "${RUN_PEERS:-1}" == 1 ]] && part peers && [[ -f "$bundle/compare-peers.sh" ]] && limit 600 60 "peers"; then
    echo "== compare-peers.sh"
    # bntrain's side with each way of launching a step that works (the table names them and
    # compares the peers with the fastest).
    # PEER_VARIANTS, when set, names them instead (a short call's subset).
    variants=graph,tuned,streams,tuned-streams; [[ $fused_ok == 1 ]] && variants+=,fused,staged
    [[ $cluster_ok == 1 ]] && variants+=,cluster
    [[ $replicated_ok == 1 ]] && part replicated && variants+=,replicated
    variants="${PEER_VARIANTS:-$variants}"
    STEP_VARIANTS=$variants DATA="$bundle/data" OUT="$logs" BUDGET="$t" timeout -k 10 "$t" bash "$bundle/compare-peers.sh" "$bin" 2>&1 | tee "$logs/peers.log"
    row "peers (see the table above)" "exit ${PIPESTATUS[0]}"
fi

# Nsight Compute's gpu__time_duration of each kernel in CSV file $1, summed per kernel and
# divided: UNIT "step" by the whole steps profiled (from the first batch gather to just
# before the last one: a step starts with its gather, so every kernel counts once a step);
# UNIT "pair" by POINTS/2 pairs of evaluation points, the fused steps' kernels left out.
kernel_durations() { # CSV UNIT [POINTS]
    python3 - "$@" <<'PY'
import csv, sys
path, unit = sys.argv[1], sys.argv[2]
rows = [r for r in csv.reader(l for l in open(path) if l.startswith('"'))]
if len(rows) < 2:
    sys.exit("FAIL: no kernel rows (see the .err log)")
head, rows = rows[0], rows[1:]
name, value, grid, block = (head.index(k) for k in ("Kernel Name", "Metric Value", "Grid Size", "Block Size"))
if unit == "step":
    starts = [i for i, r in enumerate(rows) if r[name].startswith("gather_rows")]
    if len(starts) < 2:
        sys.exit("FAIL: fewer than two batch gathers in the profiled window")
    rows, units = rows[starts[0]:starts[-1]], len(starts) - 1
    title = f"{units} whole steps profiled; GPU time per step"
else:
    rows, units = [r for r in rows if not r[name].startswith("fused")], int(sys.argv[3]) / 2
    title = f"GPU time per point (BN and plain together, over {int(sys.argv[3])}): a pair of points"
total, per = 0.0, {}
for r in rows:
    ns = float(r[value].replace(",", ""))
    k = r[name][:90]
    calls, t, shapes = per.get(k, (0, 0.0, set()))
    per[k] = (calls + 1, t + ns, shapes | {f"{r[grid]}x{r[block]}"})
    total += ns
print(f"{title} {total / units / 1000:.1f} µs (kernels back to back, no launch gaps; ncu locks the clocks)")
for k, (calls, t, shapes) in sorted(per.items(), key=lambda kv: -kv[1][1]):
    print(f"  {t / units / 1000:8.2f} µs/{unit}  {calls / units:5.1f}×  {' '.join(sorted(shapes))[:40]:<40} {k}")
PY
}

# Where a step's time goes (docs/perf.md): every kernel of a few eager steps timed by Nsight
# Compute, summed per kernel per step; and the fused kernel's stall reasons.
if part profile && command -v ncu >/dev/null; then
    for config in seed wide; do
        limit 60 20 "profile $config (eager, ncu)" || break
        echo "== ncu: BNTRAIN_CUDA_STEP=eager bntrain bench --config $config (kernel durations)"
        BNTRAIN_CUDA_STEP=eager timeout -k 10 "$t" ncu --metrics gpu__time_duration.sum --csv --print-units base --launch-skip 60 --launch-count 80 \
            "$bin" --device cuda bench --config "$config" --runs 1 --seconds 0.01 > "$logs/profile-$config.csv" 2> "$logs/profile-$config.err"
        kernel_durations "$logs/profile-$config.csv" step 2>&1 | tee "$logs/profile-$config.txt"
        row "profile $config (eager, ncu)" "$(head -n 1 "$logs/profile-$config.txt" 2>/dev/null | grep . || echo FAIL)"
    done
    # The fused kernel's stall reasons, unstaged and staged (BNTRAIN_FUSED_STAGE).
    for variant in fused staged; do
        stage=0; [[ $variant == staged ]] && stage=1
        [[ $fused_ok == 1 ]] && limit 60 20 "profile seed ($variant, ncu)" || continue
        echo "== ncu: BNTRAIN_FUSED_STAGE=$stage BNTRAIN_CUDA_STEP=fused bntrain bench --config seed (stall reasons)"
        BNTRAIN_FUSED_STAGE=$stage BNTRAIN_CUDA_STEP=fused timeout -k 10 "$t" ncu --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
            --section WarpStateStats --section SourceCounters -k regex:fused --launch-skip 2 --launch-count 1 \
            "$bin" --device cuda bench --config seed --runs 1 --seconds 0.01 > "$logs/profile-$variant.txt" 2>&1
        grep -E "Duration|Registers|Achieved Occupancy|No Eligible|Warp Cycles Per Issued" "$logs/profile-$variant.txt"
        row "profile seed ($variant, ncu)" "$(grep -m1 -E '^ *Duration' "$logs/profile-$variant.txt" | tr -s ' ' || echo FAIL)"
    done
fi

# Part "point-profile" (not in the default PARTS): where an evaluation point's time goes.
# Nsight Compute times every kernel of `bench --pair --points` but the fused steps' (the
# points' kernels are what the study adds to its steps), summed per kernel and divided by
# the points the two networks made (WARM_POINTS + TIMED_POINTS each, src/bench.rs).
if part point-profile && ! command -v ncu >/dev/null; then
    row "point profile" "SKIPPED: no ncu on this host"
elif part point-profile && limit 120 30 "point profile (ncu)"; then
    echo "== ncu: BNTRAIN_CUDA_STEP=fused bntrain bench --pair --points (every kernel but the steps')"
    BNTRAIN_CUDA_STEP=fused timeout -k 10 "$t" ncu --metrics gpu__time_duration.sum --csv --print-units base \
        "$bin" --device cuda bench --config seed --pair --points --runs 1 --seconds 0.01 > "$logs/point-profile.csv" 2> "$logs/point-profile.err"
    kernel_durations "$logs/point-profile.csv" pair $((2 * (2 + 21))) 2>&1 | tee "$logs/point-profile.txt"
    row "point profile (ncu)" "$(head -n 1 "$logs/point-profile.txt" 2>/dev/null | grep . || echo FAIL)"
    save_logs
fi

# Part "source" (not in the default PARTS): where the seed's fused kernel waits, by SASS
# instruction. For each of SOURCE_VARIANTS (default "fused": the defaults, blocks of 512 on their
# own kernel; also "staged": BNTRAIN_FUSED_STAGE=1, "fused256": blocks of 256 threads,
# "bounded512": blocks of 512 on the 64-register kernel, "replicated": the one-barrier kernel in
# blocks of 512), one launch of 50 steps of `train` (the steps between
# two evaluations) under Nsight Compute's source counters; the report's source page as CSV
# (by SASS instruction: the CUDA-line view carries no counters) and its raw metrics,
# summarized by ncu-source.py (stall reasons; the code between block barriers that holds
# most samples). The reports go to $OUT, for the GUI (the PTX carries -lineinfo), and stay
# out of the tarball.
if part source && ! command -v ncu >/dev/null; then
    row "source profile" "SKIPPED: no ncu on this host"
elif part source && [[ $fused_ok == 0 ]]; then
    row "source profile" "SKIPPED: the fused smoke test failed"
elif part source; then
    for variant in ${SOURCE_VARIANTS:-fused}; do
        kernel=fused_train_steps_512_f32 env=(BNTRAIN_CUDA_STEP=fused)
        case "$variant" in
            fused) ;;
            staged) kernel=fused_train_steps_staged_f32 env+=(BNTRAIN_FUSED_STAGE=1) ;;
            fused256) kernel=fused_train_steps_f32 env+=(BNTRAIN_FUSED_THREADS=256) ;;
            bounded512) kernel=fused_train_steps_f32 env+=(BNTRAIN_FUSED_512_KERNEL=0) ;;
            replicated) kernel=fused_train_steps_replicated_f32 env+=(BNTRAIN_FUSED_REPLICATED=512) ;;
            *) row "source profile ($variant, ncu)" "FAIL: unknown variant (fused, staged, fused256, bounded512 or replicated)"; failed=1; continue ;;
        esac
        limit 150 40 "source profile ($variant, ncu)" || break
        rep="$logs/source-$variant"
        echo "== ncu --section SourceCounters --section WarpStateStats: ${env[*]} bntrain train --steps 150 (the second launch, 50 steps)"
        env "${env[@]}" timeout -k 10 "$t" ncu --section SourceCounters --section WarpStateStats --section SchedulerStats --import-source yes \
            -k regex:"^$kernel\$" --launch-skip 1 --launch-count 1 -f -o "$rep" \
            "$bin" --device cuda train --steps 150 --eval-every 50 > "$rep.log" 2>&1
        status=$?
        timeout -k 10 60 ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep-sass.csv" 2> "$rep-sass.err"
        timeout -k 10 60 ncu -i "$rep.ncu-rep" --page raw --csv > "$rep-raw.csv" 2> "$rep-raw.err"
        python3 "$here/ncu-source.py" "$rep-sass.csv" 25 2>&1 | tee "$rep-summary.txt"
        [[ -n "${OUT:-}" && -f "$rep.ncu-rep" ]] && cp "$rep.ncu-rep" "$OUT/"
        if [[ $status -eq 0 && -s "$rep-summary.txt" ]] && ! grep -q '^ncu-source:' "$rep-summary.txt"; then
            row "source profile ($variant, ncu)" "$(sed -n 2p "$rep-summary.txt" | tr -s ' ')"
        else
            row "source profile ($variant, ncu)" "FAIL (ncu exit $status; see source-$variant*.err, .log and -summary.txt)"; failed=1
        fi
        save_logs
    done
fi

if [[ -n "$anchor" ]] && limit 300 30 "anchor $(basename "$anchor")"; then
    echo "== python3 $anchor (peer anchor, same GPU)"
    QUICK="${QUICK:-1}" timeout -k 10 "$t" python3 "$anchor" "$bundle/data" 2>&1 | tee "$logs/anchor.log"
    row "anchor $(basename "$anchor")" "exit ${PIPESTATUS[0]}, see the JSON lines above"
fi

# Each option against the same run without it, from the rows above: where the ratio is under
# 1 the option is faster, and a candidate for the default (docs/perf.md says which are).
decisions=()
decide() { # NAME BASELINE VARIANT: two bench logs, two train logs (their seconds), or two reproduce variants as reproduce:NAME
    local base="$2" variant="$3" unit="µs/step"
    [[ $base == */train-* ]] && unit="s (train)"
    if [[ $base == reproduce:* ]]; then
        base="$logs/runs/gpu-${base#reproduce:}/metrics.json" variant="$logs/runs/gpu-${variant#reproduce:}/metrics.json" unit="s (comparison)"
    fi
    decisions+=("$(printf '%-48s %s' "$1" "$(python3 - "$base" "$variant" "$unit" <<'PY'
import json, os, sys
def value(path):
    # A bench log's last JSON object's us_per_step (a train log's: its seconds); a study's
    # metrics.json's comparison time; what became of a run whose log was set aside.
    for what in ("fell-back", "failed"):
        if os.path.exists(f"{path}.{what}"):
            return what.replace("-", " ")
    try:
        if path.endswith("metrics.json"):
            return float(json.load(open(path))["timings"]["comparison_s"])
        found, key = None, "seconds" if "/train-" in path else "us_per_step"
        for line in open(path, errors="replace"):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and key in r:
                found = float(r[key])
        return found
    except (OSError, KeyError, TypeError, ValueError):
        return None
base, variant = value(sys.argv[1]), value(sys.argv[2])
if isinstance(base, str) or isinstance(variant, str):
    print(f"no decision: the baseline {base if isinstance(base, str) else 'ran'}, the variant {variant if isinstance(variant, str) else 'ran'}")
elif base is None or variant is None:
    print("not measured in this call")
else:
    print(f"{base:.2f} → {variant:.2f} {sys.argv[3]} (×{variant / base:.3f}{', faster' if variant < base else ''})")
PY
)")")
}
decide "seed fused: one barrier a step (512)" "$(bench_log seed fused f32)" "$(bench_log seed fused f32 0 0 0 0 0 0 512 0 512)"
decide "seed fused: one barrier a step (256)" "$(bench_log seed fused f32)" "$(bench_log seed fused f32 0 0 0 0 0 0 512 0 256)"
decide "seed one barrier (512): all batches" "$(bench_log seed fused f32 0 0 0 0 0 0 512 0 512)" "$(bench_log seed fused f32 0 0 0 0 0 0 512 1 512)"
decide "seed pair: one barrier, 2 launches, vs grid 1" "$(bench_log seed fused f32 0 0 2)" "$(bench_log seed fused f32 0 0 1 0 0 0 512 0 512)"
decide "seed one barrier (512): at most 50 blocks" "$(bench_log seed fused f32 0 0 0 0 0 0 512 0 512)" "$(bench_log seed fused f32 0 0 0 0 0 0 512 0 512 50)"
decide "seed pair, one barrier: at most 50 blocks" "$(bench_log seed fused f32 0 0 1 0 0 0 512 0 512)" "$(bench_log seed fused f32 0 0 1 0 0 0 512 0 512 50)"
decide "train $steps steps: one barrier a step" "$logs/train-fused-f32.log" "$logs/train-replicated-f32.log"
decide "seed fused: clusters (largest that fits)" "$(bench_log seed fused f32)" "$(bench_log seed fused f32 0 0 0 0 1)"
decide "seed fused: clusters of 8" "$(bench_log seed fused f32)" "$(bench_log seed fused f32 0 0 0 0 8)"
decide "seed fused: staged" "$(bench_log seed fused f32)" "$(bench_log seed fused f32 0 1)"
decide "seed fused: 256 threads a block" "$(bench_log seed fused f32)" "$(bench_log seed fused f32 0 0 0 0 0 0 256)"
decide "seed fused: 512 on the 64-register kernel" "$(bench_log seed fused f32)" "$(bench_log seed fused f32 0 0 0 0 0 0 512 0 0 "" 0)"
decide "seed fused: 1024 threads a block" "$(bench_log seed fused f32)" "$(bench_log seed fused f32 0 0 0 0 0 0 1024)"
decide "seed fused pair: one launch (grid)" "$(bench_log seed fused f32 0 0 1)" "$(bench_log seed fused f32 0 0 2)"
decide "seed fused pair, staged: one launch" "$(bench_log seed fused f32 0 1 1)" "$(bench_log seed fused f32 0 1 2)"
decide "seed fused pair: clusters, one launch" "$(bench_log seed fused f32 0 0 1)" "$(bench_log seed fused f32 0 0 2 0 1)"
decide "seed fused pair: clusters, two launches" "$(bench_log seed fused f32 0 0 1)" "$(bench_log seed fused f32 0 0 1 0 1)"
decide "seed graph: small-GEMM kernels" "$(bench_log seed graph f32)" "$(bench_log seed graph f32 1)"
decide "seed fused: all batches" "$(bench_log seed fused f32)" "$(bench_log seed fused f32 0 0 0 0 0 0 512 1)"
decide "seed fused, staged: all batches" "$(bench_log seed fused f32 0 1)" "$(bench_log seed fused f32 0 1 0 0 0 0 512 1)"
decide "seed fused pair, one launch: all batches" "$(bench_log seed fused f32 0 0 2)" "$(bench_log seed fused f32 0 0 2 0 0 0 512 1)"
decide "seed graph: all batches" "$(bench_log seed graph f32)" "$(bench_log seed graph f32 0 0 0 0 0 0 512 1)"
decide "seed fused, all batches: staged" "$(bench_log seed fused f32 0 0 0 0 0 0 512 1)" "$(bench_log seed fused f32 0 1 0 0 0 0 512 1)"
decide "seed fused: this build against the baseline" "$(bench_build=base bench_log seed fused f32 0 0 0 0 0 0 "${BASE_THREADS:-512}")" "$(bench_build=here bench_log seed fused f32)"
decide "seed fused pair, one launch: against baseline" "$(bench_build=base bench_log seed fused f32 0 0 2 0 0 0 "${BASE_THREADS:-512}")" "$(bench_build=here bench_log seed fused f32 0 0 2)"
decide "train batch 256, 256-wide: against baseline" "$(ceiling_log base)" "$(ceiling_log here)"
decide "seed graph: dW on a 2nd stream" "$(bench_log seed graph f32)" "$(bench_log seed graph f32 0 0 0 0 0 1)"
for precision in f32 tf32 bf16; do
    decide "wide graph $precision: tuned GEMMs" "$(bench_log wide graph $precision)" "$(bench_log wide graph $precision 0 0 0 1)"
done
decide "wide graph f32: dW on a 2nd stream" "$(bench_log wide graph f32)" "$(bench_log wide graph f32 0 0 0 0 0 1)"
decide "wide graph f32, tuned: dW on a 2nd stream" "$(bench_log wide graph f32 0 0 0 1)" "$(bench_log wide graph f32 0 0 0 1 0 1)"
decide "wide graph tf32: dW on a 2nd stream" "$(bench_log wide graph tf32)" "$(bench_log wide graph tf32 0 0 0 0 0 1)"
# staged: staging; paired: one launch, over staged; cluster: clusters and one launch
# together; tuned: the evaluations' GEMMs tuned; streams: the evaluation stream.
for variant in streams cluster staged tuned graph; do
    decide "reproduce: $variant against fused" reproduce:fused "reproduce:$variant"
done
decide "reproduce: paired against staged" reproduce:staged reproduce:paired
decide "reproduce: the defaults (paired) against fused" reproduce:fused reproduce:default
decide "reproduce: the defaults against the baseline's" reproduce:baseline reproduce:default
decide "reproduce: one barrier against the defaults" reproduce:default reproduce:replicated
decide "reproduce: one barrier, streams" reproduce:replicated reproduce:replicated-streams
decide "reproduce: one barrier, at most 50 blocks" reproduce:replicated reproduce:replicated-50
decide "reproduce: one barrier, 50 blocks, streams" reproduce:replicated-50 reproduce:replicated-50-streams
decide "reproduce: 1024 threads a block against fused" reproduce:fused reproduce:blocks1024
decide "reproduce: streams, 1024 threads against 1024" reproduce:blocks1024 reproduce:blocks1024-streams
decide "reproduce: cluster-streams against cluster" reproduce:cluster reproduce:cluster-streams

echo
echo "== decisions (each option against the same run without it)"
printf '%s\n' "${decisions[@]}"
echo
echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1); ${SECONDS}s)"
printf '%s\n' "${summary[@]}"
echo "logs: $logs"
if [[ -n "${OUT:-}" ]]; then
    printf '%s\n' "${decisions[@]}" > "$OUT/decisions.txt"
    save_logs && echo "logs and reports (without checkpoints and SVGs): \$OUT/gpu-check.tar.gz; rows: \$OUT/summary.txt"
fi
exit $failed
