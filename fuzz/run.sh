#!/usr/bin/env bash
# Runs the fuzz targets: `make fuzz-smoke` (every target briefly, in CI) and
# `make fuzz` (the long run). Needs cargo-fuzz: `bash scripts/install-deps.sh
# fuzz` installs the pinned version.
#
#   bash fuzz/run.sh smoke [TARGET...]   each target for FUZZ_SMOKE_RUNS executions or
#                                        FUZZ_SMOKE_SECONDS seconds, whichever comes first
#   bash fuzz/run.sh long [TARGET...]    each target for FUZZ_RUNS executions
#   bash fuzz/run.sh cmin [TARGET...]    minimise what long runs found (fuzz/work/<target>/)
#                                        plus fuzz/corpus/<target>/grown/ into a new grown/:
#                                        the inputs that add coverage beyond the seeds
#
# Settings (environment):
#   FUZZ_RUNS            executions per target in the long run (default 10000000)
#   FUZZ_JOBS            targets fuzzed at the same time (default 1)
#   FUZZ_MAX_SECONDS     long run: also stop a target after this many seconds (default 0: no limit)
#   FUZZ_FORK            long run: fuzz each target in this many processes at once, as one
#                        run (libFuzzer's -fork=N: FUZZ_RUNS counts the executions of all of
#                        them; default 0: one process). For a target too slow to reach
#                        FUZZ_RUNS on one core in the time there is. The processes are
#                        restarted from the corpus job by job, so "peak RSS" is not known
#                        (each still stops at FUZZ_RSS_LIMIT_MB).
#   FUZZ_SMOKE_RUNS      executions per target in the smoke run (default 200000)
#   FUZZ_SMOKE_SECONDS   seconds per target in the smoke run (default 6: 12 targets in about
#                        a minute and a half with the corpus loading)
#   FUZZ_RSS_LIMIT_MB    memory limit of one fuzzing process: more is a failure (default 2048)
#   FUZZ_TIMEOUT_S       time limit of one input: more is a failure (a hang) (default 10)
#   FUZZ_NICE            niceness of the fuzzing processes (default 10: the machine is shared)
#
# Any crash, panic, leak, timeout or memory-limit breach fails the run (exit 1);
# the input that caused it is kept under fuzz/artifacts/<target>/. The corpus a
# run grows goes to fuzz/work/<target>/ (long) or fuzz/work/smoke/<target>/
# (smoke, emptied first); the committed seeds in fuzz/corpus/<target>/ are only
# read. A summary line per target (executions, seconds, exec/s, peak RSS at 10 %
# of the run and at the end, coverage) is printed and appended to
# fuzz/work/summary-<mode>.tsv.
set -euo pipefail

# The repository root, also when a copy of this script runs from elsewhere in
# it (a long run should run from a copy: bash reads a script as it goes).
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

# Fastest first, so a long run that is cut short has done the most targets.
ALL_TARGETS=(token_file proxy_protocol control_json vmware_filter qmp rfb_handshake websocket_decoder http_upgrade http_response frame_tracker websocket_roundtrip soap config)

mode="${1:-}"
case "$mode" in
smoke | long | cmin) shift ;;
*)
    echo "usage: $0 smoke|long|cmin [TARGET...]" >&2
    exit 2
    ;;
esac
targets=("$@")
[ "${#targets[@]}" -eq 0 ] && targets=("${ALL_TARGETS[@]}")

runs_long="${FUZZ_RUNS:-10000000}"
jobs="${FUZZ_JOBS:-1}"
max_seconds="${FUZZ_MAX_SECONDS:-0}"
forks="${FUZZ_FORK:-0}"
smoke_runs="${FUZZ_SMOKE_RUNS:-200000}"
smoke_seconds="${FUZZ_SMOKE_SECONDS:-6}"
rss_limit_mb="${FUZZ_RSS_LIMIT_MB:-2048}"
timeout_s="${FUZZ_TIMEOUT_S:-10}"
niceness="${FUZZ_NICE:-10}"

# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=address); the stable
# toolchain accepts them with RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1
# Release code with debug assertions and overflow checks on, so the
# product's debug_assert! invariants are checked too, and the address
# sanitizer (with its leak checker).
BUILD_FLAGS=(--release --debug-assertions --sanitizer=address)
BIN_DIR=fuzz/target/x86_64-unknown-linux-gnu/release

log() { echo "fuzz($mode): $*" >&2; }

# Longest input libFuzzer makes for a target (-max_len), where long inputs
# cost much and reach nothing short ones do not; others keep libFuzzer's
# default (the longest corpus input, at least 4096). Corpus inputs over the
# limit are cut to it when loaded (the files stay whole). See "Fuzz target
# throughput" in docs/RELIABILITY.md for the measurements.
max_len_for() {
    case "$1" in
    # A frame header declares its length (7-, 16- or 64-bit form) whatever
    # follows, so every length path, limit check and "payload cut short"
    # case fits in 4 KiB; a payload beyond that only repeats Payload steps.
    # Without it the 70 KB seeds let libFuzzer grow inputs to 70 KB.
    frame_tracker) echo 4096 ;;
    # Records carry payloads the harness frames itself: 126 bytes reach the
    # 16-bit length form (95 in base64 mode), and the 64-bit form would
    # need 48 KiB or more at any limit. 1 KiB holds several such frames;
    # every byte more is decoded twice (both roles) a few bytes per call.
    websocket_roundtrip) echo 1024 ;;
    *) echo 0 ;;
    esac
}

command -v cargo-fuzz >/dev/null 2>&1 || {
    log "cargo-fuzz not found: run 'bash scripts/install-deps.sh fuzz'"
    exit 1
}

# One cargo invocation builds every target, sharing the instrumented library.
# The runs below start the binaries directly, so nothing is rebuilt while a
# long run goes on.
log "building ${#ALL_TARGETS[@]} targets"
nice -n "$niceness" cargo fuzz build "${BUILD_FLAGS[@]}"

mkdir -p fuzz/work
summary="fuzz/work/summary-$mode.tsv"
[ "$mode" = cmin ] || [ -f "$summary" ] || printf 'target\texecutions\tseconds\texec_per_s\trss_mb_at_10pct\tpeak_rss_mb\tcov\tft\tcorpus\tresult\tdate\n' >"$summary"

# The libFuzzer status line field after `name:`, from the last line holding it.
status_field() {
    grep -oE "$1: [0-9]+" | tail -1 | grep -oE '[0-9]+$' || echo "?"
}

run_target() {
    local target="$1" work runs limits=() logfile start end result
    if [ "$mode" = smoke ]; then
        work="fuzz/work/smoke/$target"
        rm -rf "$work"
        runs="$smoke_runs"
        limits=(-max_total_time="$smoke_seconds")
    else
        work="fuzz/work/$target"
        runs="$runs_long"
        limits=(-max_total_time="$max_seconds")
        [ "$forks" -eq 0 ] || limits+=(-fork="$forks")
    fi
    local max_len
    max_len=$(max_len_for "$target")
    [ "$max_len" -eq 0 ] || limits+=(-max_len="$max_len")
    mkdir -p "$work" "fuzz/artifacts/$target"
    logfile="fuzz/work/$target-$mode.log"
    start=$(date +%s)
    result=ok
    # What `cargo fuzz run` would start, plus our limits.
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}" nice -n "$niceness" \
        "$BIN_DIR/$target" -artifact_prefix="fuzz/artifacts/$target/" \
        -dict="fuzz/dict/$target.dict" -runs="$runs" "${limits[@]}" \
        -rss_limit_mb="$rss_limit_mb" -malloc_limit_mb="$rss_limit_mb" -timeout="$timeout_s" \
        -print_final_stats=1 "$work" "fuzz/corpus/$target" >"$logfile" 2>&1 || result=FAILED
    end=$(date +%s)
    local executions seconds rate rss_early rss_peak cov ft corpus
    # A forked run prints no final stats: its count is the last status line's.
    executions=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$logfile" | grep -oE '[0-9]+$' ||
        grep -oE 'fuzzed for [0-9]+ iterations|^#[0-9]+: cov' "$logfile" | tail -1 | grep -oE '[0-9]+' | head -1 ||
        echo "?")
    rss_peak=$(grep -oE 'stat::peak_rss_mb: *[0-9]+' "$logfile" | grep -oE '[0-9]+$' || echo "?")
    seconds=$((end - start))
    rate="?"
    [[ "$executions" =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] && rate=$((executions / seconds))
    # RSS once a tenth of the executions are done, to compare with the end
    # (a tenth of those done, when a time cap ended the run early).
    local tenth=$((runs / 10))
    [[ "$executions" =~ ^[0-9]+$ ]] && [ "$executions" -lt "$runs" ] && tenth=$((executions / 10))
    rss_early=$(awk -v tenth="$tenth" '/^#[0-9]+/ { n = substr($1, 2) + 0; if (n >= tenth) { for (i = 1; i <= NF; i++) if ($i == "rss:") { print $(i + 1); exit } } }' "$logfile" | tr -d 'Mb')
    cov=$(status_field cov <"$logfile")
    ft=$(status_field ft <"$logfile")
    corpus=$(grep -oE 'corp: [0-9]+(/[0-9]+[a-zA-Z]*)?' "$logfile" | tail -1 | cut -d' ' -f2)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$executions" "$seconds" "$rate" \
        "${rss_early:-?}" "$rss_peak" "$cov" "$ft" "${corpus:-?}" "$result" "$(date -u +%FT%TZ)" | tee -a "$summary"
    if [ "$result" != ok ]; then
        log "$target FAILED; log: $logfile; artifacts: fuzz/artifacts/$target/"
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written' "$logfile" | head -20 >&2 || true
        return 1
    fi
}

# libFuzzer's set-cover merge (what `cargo fuzz cmin` does, with a smaller
# result): the first folder starts with the seeds, so what it adds is the
# growth beyond them.
cmin_target() {
    local target="$1" merged before
    merged=$(mktemp -d)
    find "fuzz/corpus/$target" -maxdepth 1 -type f -exec cp {} "$merged/" \;
    before=$(ls "$merged")
    mkdir -p "fuzz/corpus/$target/grown" "fuzz/work/$target"
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}" nice -n "$niceness" \
        "$BIN_DIR/$target" -set_cover_merge=1 -rss_limit_mb="$rss_limit_mb" -timeout="$timeout_s" \
        "$merged" "fuzz/corpus/$target/grown" "fuzz/work/$target" >"fuzz/work/$target-cmin.log" 2>&1 || {
        log "$target: merge failed, see fuzz/work/$target-cmin.log"
        rm -rf "$merged"
        return 1
    }
    rm -rf "fuzz/corpus/$target/grown"
    mkdir -p "fuzz/corpus/$target/grown"
    for file in $(ls "$merged"); do
        grep -qxF "$file" <<<"$before" || mv "$merged/$file" "fuzz/corpus/$target/grown/"
    done
    rm -rf "$merged"
    log "$target: $(ls "fuzz/corpus/$target/grown" | wc -l) inputs, $(du -sb "fuzz/corpus/$target/grown" | cut -f1) bytes in fuzz/corpus/$target/grown/"
}

if [ "$mode" = cmin ]; then
    for target in "${targets[@]}"; do
        cmin_target "$target"
    done
    exit 0
fi

failed=0
running=0
for target in "${targets[@]}"; do
    [ -f "fuzz/fuzz_targets/$target.rs" ] || {
        log "no such target: $target (have: ${ALL_TARGETS[*]})"
        exit 2
    }
    if [ "$jobs" -le 1 ]; then
        run_target "$target" || failed=1
        continue
    fi
    run_target "$target" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
done
while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done

if [ "$failed" -ne 0 ]; then
    log "at least one target failed (see above)"
    exit 1
fi
log "all ${#targets[@]} targets passed"
