#!/usr/bin/env bash
# Installs what `make` needs on a Debian 12 machine, and nothing when it is all
# there already (so `make test` stays quick on a warm machine).
#
#   bash scripts/install-deps.sh build   C toolchain for ring (gcc, pkg-config); checks cargo
#   bash scripts/install-deps.sh test    peers of the end-to-end tests: TigerVNC Xvnc (and
#                                        vncpasswd), QEMU, noVNC, Chromium, Go and govmomi's
#                                        simulator sources, websockify, and tests/browser's
#                                        node_modules (playwright-core, opennebula-wmks,
#                                        pinned by package-lock.json)
#   bash scripts/install-deps.sh fuzz    cargo-fuzz at the pinned version (installed with cargo
#                                        when missing or at another version) and g++ (libfuzzer-sys
#                                        compiles libFuzzer's C++)
#
# As root, missing Debian packages are installed with apt-get (one `apt-get update`
# at most). As another user, the script names what is missing and how to install
# it, and exits non-zero: it never skips a peer silently.
set -euo pipefail

cd "$(dirname "$0")/.."

mode="${1:-}"
case "$mode" in
build | test | fuzz) ;;
*)
    echo "usage: $0 build|test|fuzz" >&2
    exit 2
    ;;
esac

export DEBIAN_FRONTEND=noninteractive

log() { echo "install-deps($mode): $*" >&2; }
die() {
    echo "install-deps($mode): error: $*" >&2
    exit 1
}

# Debian packages still to install, as "package|why" (why = the command or file it provides).
missing=()

# need_pkg PACKAGE CHECK...: CHECK is `cmd NAME` (a command on PATH), `file PATH`
# (an executable or regular file) or `dpkg` (the package itself is installed).
need_pkg() {
    local pkg="$1" kind="$2" what="${3:-}"
    case "$kind" in
    cmd) command -v "$what" >/dev/null 2>&1 && return 0 ;;
    file) [ -e "$what" ] && return 0 ;;
    dpkg) dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && return 0 ;;
    esac
    missing+=("$pkg|${what:-$pkg}")
}

install_missing() {
    [ "${#missing[@]}" -eq 0 ] && return 0
    local pkgs=() m
    for m in "${missing[@]}"; do pkgs+=("${m%%|*}"); done
    if [ "$(id -u)" -ne 0 ]; then
        for m in "${missing[@]}"; do
            echo "install-deps($mode): missing: Debian package ${m%%|*} (for ${m#*|})" >&2
        done
        die "not root, cannot install; run: sudo apt-get update && sudo apt-get install -y ${pkgs[*]}"
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install these packages by hand: ${pkgs[*]}"
    log "installing ${pkgs[*]}"
    # One `apt-get update` at most, skipped when the package lists are less
    # than an hour old; an install that then fails gets one update and a retry.
    local updated=""
    if ! find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 2>/dev/null | grep -q .; then
        apt-get update -q
        updated=1
    fi
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}"; then
        [ -n "$updated" ] && die "apt-get install ${pkgs[*]} failed"
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" || die "apt-get install ${pkgs[*]} failed"
    fi
    missing=()
}

check_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            die "cargo is installed in $HOME/.cargo/bin but not on PATH: run 'source \$HOME/.cargo/env'"
        fi
        die "cargo (the Rust toolchain) not found: install it with rustup (https://rustup.rs), then re-run make"
    fi
    command -v rustc >/dev/null 2>&1 || die "rustc not found next to cargo: reinstall the Rust toolchain with rustup"
}

deps_build() {
    check_cargo
    need_pkg gcc cmd gcc
    need_pkg pkg-config cmd pkg-config
    install_missing
}

# tests/browser/node_modules is current when every dependency package.json
# pins (playwright-core, opennebula-wmks) is there at that version; otherwise
# npm ci reinstalls exactly what package-lock.json says.
browser_modules_current() {
    node -e '
        const fs = require("fs");
        const deps = JSON.parse(fs.readFileSync("package.json", "utf8")).dependencies;
        for (const [name, want] of Object.entries(deps)) {
            let have = null;
            try { have = JSON.parse(fs.readFileSync(`node_modules/${name}/package.json`, "utf8")).version; } catch (e) {}
            if (have !== want) process.exit(1);
        }
    '
}

deps_test() {
    # Xvnc: the VNC server every end-to-end test relays to; vncpasswd (tigervnc-tools)
    # makes password files for the VncAuth tests.
    need_pkg tigervnc-standalone-server cmd Xvnc
    need_pkg tigervnc-tools cmd vncpasswd
    # Xvnc needs the "fixed" font to start; Debian only recommends the package,
    # and this script installs without recommends.
    need_pkg xfonts-base file /usr/share/fonts/X11/misc/6x13.pcf.gz
    # noVNC's client (core/rfb.js) and app (vnc.html), served by the proxy's --web.
    need_pkg novnc file /usr/share/novnc/core/rfb.js
    # Debian's Chromium: /usr/lib/chromium/chromium is the real binary.
    need_pkg chromium file /usr/lib/chromium/chromium
    # QEMU (TCG) behind the QEMU backend's end-to-end tests (tests/e2e_qemu.rs).
    need_pkg qemu-system-x86 cmd qemu-system-x86_64
    # The tap device of the QEMU network-counter test (tests/e2e_events_metrics.rs).
    need_pkg iproute2 cmd ip
    # The vSphere tests build govmomi's simulator (tests/support/vcsim) offline
    # with Debian's Go and its govmomi sources.
    need_pkg golang-go cmd go
    need_pkg golang-github-vmware-govmomi-dev file /usr/share/gocode/src/github.com/vmware/govmomi/simulator/simulator.go
    # websockify --ssl-only in front of Xvnc: an independent wss peer standing in
    # for a WebMKS endpoint (tests/common/wss_backend.rs).
    need_pkg websockify cmd websockify
    # Packages (make deb / make rpm) and their real install tests
    # (tests/packaging/install-test.sh): build, lint, a debootstrapped
    # Debian 12 root booted with systemd-nspawn, rpm --root.
    need_pkg dpkg-dev cmd dpkg-buildpackage
    need_pkg debhelper cmd dh
    need_pkg lintian cmd lintian
    need_pkg rpm cmd rpmbuild
    need_pkg rpmlint cmd rpmlint
    need_pkg debootstrap cmd debootstrap
    need_pkg systemd-container cmd systemd-nspawn
    need_pkg curl cmd curl
    need_pkg openssl cmd openssl
    need_pkg python3 cmd python3
    install_missing

    # Node.js and npm come with the machine image (NodeSource). Debian's own npm
    # package conflicts with that nodejs, so the script does not install it.
    command -v node >/dev/null 2>&1 || die "node not found: install Node.js >= 20 with npm (e.g. NodeSource's nodejs package); Debian's npm package conflicts with it"
    command -v npm >/dev/null 2>&1 || die "npm not found: install Node.js >= 20 with npm (NodeSource's nodejs package includes npm)"

    local dir=tests/browser
    [ -f "$dir/package-lock.json" ] || die "$dir/package-lock.json is missing (it pins playwright-core)"
    if ! (cd "$dir" && browser_modules_current); then
        log "npm ci in $dir"
        # No browser download: playwright-core drives Debian's Chromium.
        (cd "$dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error) ||
            die "npm ci in $dir failed"
    fi
}

# The cargo-fuzz that fuzz/run.sh drives; bump it here and nowhere else.
CARGO_FUZZ_VERSION=0.13.2

deps_fuzz() {
    check_cargo
    need_pkg gcc cmd gcc
    need_pkg g++ cmd g++
    install_missing
    local have
    have=$(cargo fuzz --version 2>/dev/null | awk '{print $2}') || have=""
    [ "$have" = "$CARGO_FUZZ_VERSION" ] && return 0
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION (found: ${have:-none}); about a minute"
    cargo install cargo-fuzz --locked --version "=$CARGO_FUZZ_VERSION" ||
        die "cargo install cargo-fuzz --locked --version =$CARGO_FUZZ_VERSION failed"
}

case "$mode" in
build) deps_build ;;
test) deps_test ;;
fuzz) deps_fuzz ;;
esac
