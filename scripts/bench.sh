#!/usr/bin/env bash
# `make bench`: every benchmark in one run — latency, throughput, idle-session
# memory and handshakes — for consolegate (io_uring and epoll) against direct
# TCP, a plain TCP relay and websockify, plus session start (creation → first
# relayed byte) of consolegate in appliance mode and its CPU per GB with
# several bulk downstream sessions at once (by thread: workers, io-wq), all
# on 127.0.0.1; one combined report.
#
#   bash scripts/bench.sh                          # `consolegate-bench all` with its defaults
#   bash scripts/bench.sh --runs 1 --skip memory   # extra args go to the bench
#   bash scripts/bench.sh --consolegate-arg=--workers=1   # a consolegate variant
#   bash scripts/bench.sh latency --runs 5         # one benchmark alone
#                                                  # (latency|throughput|memory|handshakes|session-start|downstream-bulk|webmks|hypervisors|console-url|events)
#
# Steps: release build; a Python virtualenv at bench/.venv with websockify and
# numpy pinned (websockify unmasks with numpy when it is importable); then the
# bench, which writes bench/results/<UTC time>/ (report.md, report.json,
# latency.svg, per-benchmark .txt/.json, hgrm/, logs/) and points
# bench/results/latest at it. After an `all` run, the summary and the plot are
# copied to docs/bench/ (small, meant to be committed with docs/BENCHMARKS.md).
# Every server it starts listens on 127.0.0.1 and is stopped at the end.
#
# The bench raises its soft open-file limit to the hard limit; kernel settings
# from tuning/99-consolegate.conf are only reported, unless --apply-sysctl is
# passed (it runs `sysctl -w`, which changes the machine until reboot).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
PYTHON=${PYTHON:-python3}
VENV=bench/.venv

# Exact pins, transitive dependencies included, so every machine measures the
# same websockify. Bump together; the stamp file below triggers a reinstall.
WEBSOCKIFY_VERSION=0.13.0
NUMPY_VERSION=2.4.6
PY_PINS=(
    "websockify==${WEBSOCKIFY_VERSION}"
    "numpy==${NUMPY_VERSION}"
    "certifi==2026.10.18"
    "cffi==2.1.1"
    "charset-normalizer==3.5.2"
    "cryptography==50.0.2"
    "idna==3.20"
    "jwcrypto==1.6.1"
    "pycparser==3.12"
    "redis==8.1.0"
    "requests==2.34.2"
    "typing_extensions==4.16.0"
    "urllib3==2.8.0"
)

log() { printf 'bench.sh: %s\n' "$*" >&2; }

# --- 1. build ---------------------------------------------------------------
BUILD=full
EXTRA_ARGS=()
if ! "$CARGO" build --locked --release --workspace; then
    # The proxy may be mid-edit; still measure the others rather than nothing,
    # and never benchmark a stale consolegate binary.
    log "WARNING: workspace release build failed; building the bench alone and"
    log "WARNING: leaving consolegate out of this run"
    "$CARGO" build --locked --release -p consolegate-bench
    BUILD=bench-only
    EXTRA_ARGS+=(--proxies plain-relay,websockify)
fi

# --- 2. websockify virtualenv -------------------------------------------------
STAMP="$VENV/.consolegate-bench-pins"
WANT_STAMP="$(printf '%s\n' "${PY_PINS[@]}")"
if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT_STAMP" ]]; then
    if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        # Debian splits venv/ensurepip out of python3.
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
            log "installing python3-venv"
            apt-get install -y -q python3-venv >/dev/null
        else
            log "python3 lacks venv/ensurepip: install python3-venv"
            exit 1
        fi
    fi
    log "creating $VENV (websockify $WEBSOCKIFY_VERSION, numpy $NUMPY_VERSION)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q \
        --only-binary=numpy,cryptography,cffi "${PY_PINS[@]}"
    printf '%s\n' "$WANT_STAMP" >"$STAMP"
fi
# websockify must find numpy, or it silently falls back to a slower unmasker.
"$VENV/bin/python" - <<'EOF'
import warnings
warnings.simplefilter("error")
import websockify.websocket as ws
assert ws.numpy is not None, "websockify does not see numpy"
EOF

# --- 3. run -------------------------------------------------------------------
STAMP_UTC="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/results/$STAMP_UTC"
mkdir -p "$OUT"
GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo none)"
if [[ -n "$(git status --porcelain 2>/dev/null | head -1)" ]]; then GIT_REV="$GIT_REV+dirty"; fi

SUBCOMMAND=all
case "${1:-}" in
    all|latency|throughput|memory|handshakes|session-start|downstream-bulk|webmks|hypervisors|console-url|events) SUBCOMMAND=$1; shift ;;
esac

STATUS=0
START_S=$SECONDS
target/release/consolegate-bench "$SUBCOMMAND" \
    --out-dir "$OUT" \
    --websockify "$VENV/bin/websockify" \
    --consolegate target/release/consolegate \
    --meta "websockify=$WEBSOCKIFY_VERSION" \
    --meta "numpy=$NUMPY_VERSION" \
    --meta "python=$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')" \
    --meta "rustc=$(rustc --version 2>/dev/null || echo unknown)" \
    --meta "git=$GIT_REV" \
    --meta "build=$BUILD" \
    "${EXTRA_ARGS[@]}" "$@" || STATUS=$?

ln -sfn "$STAMP_UTC" bench/results/latest
log "results: $OUT (also bench/results/latest); bench wall time $((SECONDS - START_S)) s"

# --- 4. publish the summary next to the docs ----------------------------------
if [[ "$SUBCOMMAND" == all && -f "$OUT/report.md" ]]; then
    mkdir -p docs/bench
    cp "$OUT/report.md" docs/bench/summary.md
    [[ -f "$OUT/latency.svg" ]] && cp "$OUT/latency.svg" docs/bench/latency.svg
    log "copied report.md and latency.svg to docs/bench/"
fi
exit "$STATUS"
