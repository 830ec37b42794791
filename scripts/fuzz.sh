#!/usr/bin/env bash
# Fuzzes bntrain's two parsers of untrusted files with cargo-fuzz (libFuzzer):
#   idx                the IDX reader (images and labels, raw and gzip): bntrain::data::parse_idx_*
#   checkpoint         the checkpoint loader, Checkpoint::from_bytes, on raw bytes (and on the
#                      same bytes with the safetensors header length repaired)
#   checkpoint_config  the checkpoint loader on a valid checkpoint whose configuration
#                      metadata is the fuzz input: reaches what the loader does after the checksum
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 300 seconds, every target)
#        scripts/fuzz.sh --minimize [TARGET...]    (cmin the grown corpus before committing)
#
# Needs `cargo install cargo-fuzz`. cargo-fuzz wants nightly features; on a stable toolchain
# the script sets RUSTC_BOOTSTRAP=1. It uses AddressSanitizer when the toolchain ships its
# runtime (librustc-*_rt.asan.a), else `-s none`; FUZZ_SANITIZER=none|address overrides.
# Builds keep debug assertions (-a), so an integer overflow is a crash too.
#
# Layout (fuzz/ is its own crate, outside the main build):
#   fuzz/seeds/TARGET/      hand-made seeds (valid files and classic corruptions), committed;
#                           regenerate: cargo test --test fuzz_regressions -- --ignored write_seed_corpus
#   fuzz/corpus/TARGET/     what the fuzzer grew, minimized with --minimize, committed (< 2 MB)
#   fuzz/artifacts/TARGET/  crash cases, committed as regression inputs after the fix
#   fuzz/TARGET.dict        libFuzzer dictionary (header words, magic numbers, huge sizes)
#   fuzz/target/            build output (ignored); logs in fuzz/target/logs/
# tests/fuzz_regressions.rs replays all of them through the parsers on every `cargo test`.
#
# libFuzzer options used: -max_len=4096 (every branch of both formats fits; keeps runs fast),
# -rss_limit_mb=2048 (and with ASan -malloc_limit_mb=2048: a parser that tries to allocate
# more than that for a 4 KiB input is a crash), -print_final_stats=1 (executions, rate).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"

all_targets=(idx checkpoint checkpoint_config)
minimize=false
seconds=300
if [[ "${1:-}" == "--minimize" ]]; then
    minimize=true
    shift
elif [[ "${1:-}" =~ ^[0-9]+$ ]]; then
    seconds="$1"
    shift
fi
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=("${all_targets[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: run \`cargo install cargo-fuzz\`" >&2
    exit 1
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1 # cargo-fuzz passes -Z flags; allow them on stable
fi
sysroot="$(rustc --print sysroot)"
host="$(rustc -vV | sed -n 's/^host: //p')"
if [[ -z "${FUZZ_SANITIZER:-}" ]]; then
    if ls "$sysroot/lib/rustlib/$host/lib/"librustc-*_rt.asan.a >/dev/null 2>&1; then
        FUZZ_SANITIZER=address
    else
        FUZZ_SANITIZER=none
    fi
fi
flags=(-a -s "$FUZZ_SANITIZER")
limits=(-rss_limit_mb=2048)
[[ "$FUZZ_SANITIZER" == address ]] && limits+=(-malloc_limit_mb=2048)

if $minimize; then
    for t in "${targets[@]}"; do
        # Keep one input per covered edge (not per hit-count bucket): the corpus stays small.
        cargo fuzz cmin "${flags[@]}" "$t" "corpus/$t" -- -max_len=4096 -use_counters=0
        echo "corpus/$t: $(ls "corpus/$t" | wc -l) files, $(du -sh "corpus/$t" | cut -f1)"
    done
    exit 0
fi

mkdir -p target/logs
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t"
    log="target/logs/$t.log"
    dict=()
    [[ -f "$t.dict" ]] && dict=(-dict="$t.dict")
    echo "== fuzzing $t for ${seconds}s (sanitizer: $FUZZ_SANITIZER); log: fuzz/$log"
    # New inputs go to the first directory (corpus/), the seeds are read only.
    set -x
    cargo fuzz run "${flags[@]}" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -max_len=4096 "${limits[@]}" "${dict[@]}" -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    { set +x; } 2>/dev/null
    grep -E 'stat::number_of_executed_units|stat::average_exec_per_sec|Done [0-9]+ runs' "$log" || true
    if grep -qE '^==[0-9]+==|panicked|SUMMARY: libFuzzer|Test unit written to' "$log"; then
        echo "!! $t: crash; the input is in fuzz/artifacts/$t/ (see the log)"
        grep -E 'panicked|SUMMARY|Test unit written to' "$log" | head -5
    else
        echo "   $t: no crash"
    fi
done
exit "$status"
