#!/usr/bin/env bash
# Real install tests of the packages (root only; `make package-test`, part of
# `make test` when root). docs/PACKAGING.md describes what each step checks.
#
#   tests/packaging/install-test.sh DEB_OLD DEB_NEW RPM_OLD RPM_NEW
#
# ONLY=deb|rpm|rpm-systemd runs one of the three tests (while working on it).
#
# A minimal Debian 12 root is made once with debootstrap and cached in
# $CONSOLEGATE_TEST_CACHE (default /var/cache/consolegate-test, outside the
# checkout; ~2 min the first time, then ~250 MB reused); each test works on a
# copy. The deb test boots the copy with systemd-nspawn (private network, so
# the appliance's default ports collide with nothing on the host) and drives
# it with nsenter. A missing tool is a failure, not a skip.
set -euo pipefail

DEB_OLD=${1:?deb (old)} DEB_NEW=${2:?deb (new)} RPM=${3:?rpm (old)} RPM_NEW=${4:?rpm (new)}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${CONSOLEGATE_TEST_CACHE:-/var/cache/consolegate-test}
BASE=$CACHE/bookworm-minbase
RPM_BASE=$CACHE/bookworm-rpm
# Deadlines, seconds.
BOOT_S=60 SERVICE_S=30 WATCHDOG_RESTART_S=40 FRAMES_S=20 STALL_S=20
# The test's drop-in shortens the watchdog and the worker stall threshold so
# the stuck-worker check takes seconds (a stall is seen after
# WORKER_STALL_MS, the watchdog fires WatchdogSec later).
WORKER_STALL_MS=3000

fail() { echo "FAIL: $*" >&2; [ -n "${PID1:-}" ] && nsenter -t "$PID1" -a journalctl -u consolegate --no-pager -n 40 -o verbose | grep -E "^ *(MESSAGE|CG_[A-Z_]*)=" >&2 || true; exit 1; }
step() { echo "== $*"; }
for tool in debootstrap systemd-nspawn nsenter rpm python3 curl openssl systemd-analyze dpkg-deb; do
    command -v "$tool" >/dev/null || fail "$tool is missing: run scripts/install-deps.sh test"
done
[ "$(id -u)" = 0 ] || fail "the install tests need root (debootstrap, systemd-nspawn, rpm --root)"
mkdir -p "$CACHE"

# until SECONDS WHAT CMD...: poll CMD every 0.2 s until it succeeds.
until_ok() {
    local limit=$1 what=$2 end
    shift 2
    end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || fail "$what (not within ${limit} s)"
        sleep 0.2
    done
}

mirror() {
    # The configured Debian mirror (deb822 or one-line sources).
    local m
    m=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1)
    [ -n "$m" ] || m=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1)
    echo "${m:-http://deb.debian.org/debian}"
}

base_root() {
    [ -f "$BASE/.complete" ] && return
    step "debootstrap a Debian 12 root into $BASE (cached for later runs)"
    rm -rf "$BASE.partial"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$BASE.partial" "$(mirror)" \
        >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; fail "debootstrap"; }
    rm -rf "$BASE"
    mv "$BASE.partial" "$BASE"
    touch "$BASE/.complete"
}

# The base root plus Debian's rpm, for the rpm test under systemd (made once
# from the base with apt in a chroot, which has the host's network; the
# booted containers have none).
rpm_root() {
    [ -f "$RPM_BASE/.complete" ] && return
    step "add Debian's rpm to a copy of the root ($RPM_BASE, cached for later runs)"
    rm -rf "$RPM_BASE.partial"
    cp -a "$BASE" "$RPM_BASE.partial"
    rm -f "$RPM_BASE.partial/.complete"
    cp /etc/resolv.conf "$RPM_BASE.partial/etc/resolv.conf"
    { chroot "$RPM_BASE.partial" apt-get update -q &&
        chroot "$RPM_BASE.partial" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends rpm &&
        chroot "$RPM_BASE.partial" apt-get clean; } >"$CACHE/rpm-root.log" 2>&1 \
        || { tail -20 "$CACHE/rpm-root.log" >&2; fail "apt-get install rpm in the chroot"; }
    rm -rf "$RPM_BASE"
    mv "$RPM_BASE.partial" "$RPM_BASE"
    touch "$RPM_BASE/.complete"
}

WORK=$(mktemp -d "$CACHE/run.XXXXXX")
NSPAWN=
cleanup() {
    if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null; then
        kill -TERM "$NSPAWN" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$NSPAWN" 2>/dev/null || true
    fi
    [ -n "${CONSOLE:-}" ] && kill "$CONSOLE" 2>/dev/null || true
    [ -n "${STOPPER:-}" ] && kill "$STOPPER" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

in_ct() { nsenter -t "$PID1" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
in_net() { nsenter -t "$PID1" -n -- "$@"; }

exposure() {
    step "hardening: systemd-analyze security --offline=true"
    local score
    score=$(systemd-analyze security --offline=true "$REPO/packaging/consolegate.service" 2>&1 |
        sed -n 's/.*Overall exposure level for consolegate.service: \([0-9.]*\).*/\1/p')
    [ -n "$score" ] || fail "no exposure score"
    echo "exposure $score"
    awk -v s="$score" 'BEGIN { exit !(s <= 1.7) }' || fail "exposure $score > 1.7"
}

# The container's init: the process under systemd-nspawn that is PID 1 in its
# own PID namespace and runs systemd.
container_init() {
    local p
    for p in $(ps -o pid= --ppid "$1" 2>/dev/null || true) $(ps -eo pid=,ppid= | awk -v n="$1" '$2 == n {print $1}' | xargs -r -n1 ps -o pid= --ppid 2>/dev/null || true); do
        if [ "$(awk '/^NSpid:/ {print $NF}' "/proc/$p/status" 2>/dev/null)" = 1 ] &&
            [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ]; then
            echo "$p"
            return
        fi
    done
}

boot() {
    local root=$1
    : >"$WORK/console.log"
    systemd-nspawn -D "$root" -b --keep-unit --register=no --console=pipe --private-network \
        >"$WORK/console.log" 2>&1 &
    NSPAWN=$!
    local end=$((SECONDS + BOOT_S))
    PID1=
    while [ -z "$PID1" ]; do
        PID1=$(container_init "$NSPAWN")
        [ $SECONDS -lt $end ] || fail "the container did not start: $(tail -5 "$WORK/console.log")"
        sleep 0.1
    done
    until_ok "$BOOT_S" "the container's systemd to finish booting" \
        sh -c "nsenter -t $PID1 -a systemctl is-system-running | grep -Eq 'running|degraded'"
}

# Mode and owners as the root's own passwd and group files name them.
mode_of() { chroot "$1" stat -c '%a %U %G' "$2"; }
service_prop() { in_ct systemctl show -p "$1" --value consolegate; }
api() { in_net curl -fsS -H "Authorization: Bearer $(cat "$ROOT/etc/consolegate/admin-token")" "http://127.0.0.1:8080$1"; }
fingerprint() { in_net sh -c 'openssl s_client -connect 127.0.0.1:6080 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256'; }
cert() { openssl req -x509 -newkey rsa:2048 -nodes -subj "/CN=$1" -days 2 -keyout "$2/key.pem" -out "$2/cert.pem" 2>/dev/null; }
frames() { cat "$WORK/frames" 2>/dev/null || echo 0; }
wait_frames() {
    local want=$(( $(frames) + $1 )) end=$((SECONDS + FRAMES_S))
    while [ "$(frames)" -lt "$want" ]; do
        kill -0 "$CONSOLE" 2>/dev/null || fail "the live console ended: $(cat "$WORK/console.out")"
        [ $SECONDS -lt $end ] || fail "the live console stalled at $(frames) frames"
        sleep 0.1
    done
}
start_console() {
    rm -f "$WORK/frames" "$WORK/stop"
    in_net python3 "$HERE/console.py" http://127.0.0.1:8080 "$ROOT/etc/consolegate/admin-token" \
        "$WORK/frames" "$WORK/stop" >"$WORK/console.out" 2>&1 &
    CONSOLE=$!
    wait_frames 10
}

# copy_root BASE DIR: a copy of the cached root (ROOT=DIR) with the test's
# drop-in: a short watchdog and worker stall
# threshold so the stuck-worker check is quick.
copy_root() {
    ROOT=$2
    step "copy the cached root"
    cp -a "$1" "$ROOT"
    mkdir -p "$ROOT/etc/systemd/system/consolegate.service.d"
    printf '[Service]\nWatchdogSec=3s\nTimeoutAbortSec=3s\nEnvironment=CONSOLEGATE_CONTROL_WORKER_STALL_MS=%s\n' \
        "$WORKER_STALL_MS" >"$ROOT/etc/systemd/system/consolegate.service.d/test.conf"
}

http_code() { in_net curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:8080$1" || true; }

# One worker thread stuck (ptrace-stopped by stop_thread.py from the host),
# the rest of the process running: the control plane sees the stall
# (/readyz 503, same main PID), withholds the watchdog pings, and systemd
# kills and restarts the service, which serves again.
stuck_worker_restarts() {
    step "one stuck worker thread (the rest running) stops the watchdog pings; systemd restarts the service"
    local pid restarts end
    pid=$(service_prop MainPID)
    restarts=$(service_prop NRestarts)
    rm -f "$WORK/stopped"
    python3 "$HERE/stop_thread.py" "$PID1" "$pid" cg-worker-0 "$WORK/stopped" >"$WORK/stop_thread.out" 2>&1 &
    STOPPER=$!
    end=$((SECONDS + 10))
    until [ -s "$WORK/stopped" ]; do
        kill -0 "$STOPPER" 2>/dev/null || fail "stop_thread.py: $(cat "$WORK/stop_thread.out")"
        [ $SECONDS -lt $end ] || fail "the worker thread did not stop within 10 s: $(cat "$WORK/stop_thread.out")"
        sleep 0.1
    done
    # The rest runs: the control plane answers and reports the stall.
    end=$((SECONDS + STALL_S))
    until [ "$(http_code /readyz)" = 503 ]; do
        [ "$(service_prop MainPID)" = "$pid" ] || fail "restarted before /readyz reported the stalled worker"
        [ $SECONDS -lt $end ] || fail "/readyz did not report the stalled worker (not within ${STALL_S} s)"
        sleep 0.2
    done
    [ "$(service_prop MainPID)" = "$pid" ] || fail "the main PID changed while the worker was stopped"
    [ "$(http_code /healthz)" = 200 ] || fail "/healthz while one worker is stopped: the rest of the process should run"
    until_ok "$WATCHDOG_RESTART_S" "a restart after the watchdog timeout (NRestarts above $restarts)" \
        sh -c "[ \$(nsenter -t $PID1 -a systemctl show -p NRestarts --value consolegate) -gt $restarts ]"
    until_ok "$SERVICE_S" "consolegate active again" in_ct systemctl is-active consolegate
    [ "$(service_prop MainPID)" != "$pid" ] || fail "same main PID after the restart"
    in_ct journalctl -u consolegate --no-pager | grep -q "Watchdog timeout" || fail "no watchdog timeout in the journal"
    until_ok "$SERVICE_S" "/healthz answering after the restart" sh -c "[ \"\$(nsenter -t $PID1 -n curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/healthz)\" = 200 ]"
    api /api/v1/stats >/dev/null || fail "the API after the restart"
    # The helper leaves once the process is gone; stop it by PID if not.
    end=$((SECONDS + 10))
    while kill -0 "$STOPPER" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
    kill "$STOPPER" 2>/dev/null || true
    wait "$STOPPER" || fail "stop_thread.py: $(cat "$WORK/stop_thread.out")"
    STOPPER=
}

# upgrade_keeps_consoles LOG CMD...: run the package manager's upgrade CMD in
# the container while a console is live (start_console) and a session is
# admitted but not yet connected, and check the hand-off: the package did not
# fall back to a restart, a new main PID without a systemd restart, the old
# process alive and the live console flowing, the admitted session
# connecting through the new process, the old process exiting once its last
# console ends.
upgrade_keeps_consoles() {
    local log=$1 old_pid restarts new_pid
    shift
    old_pid=$(service_prop MainPID)
    restarts=$(service_prop NRestarts)
    rm -f "$WORK/admitted" "$WORK/go"
    in_net python3 "$HERE/console.py" --admit-only http://127.0.0.1:8080 "$ROOT/etc/consolegate/admin-token" \
        "$WORK/admitted" "$WORK/go" >"$WORK/admitted.out" 2>&1 &
    ADMITTED=$!
    until_ok 20 "the admitted session" grep -qx admitted "$WORK/admitted"
    in_ct "$@" >"$log" 2>&1 || { cat "$log"; fail "upgrade: $*"; }
    grep -q "did not finish" "$log" && fail "the package fell back to a restart: $(cat "$log")"
    in_ct systemctl is-active consolegate >/dev/null || fail "inactive after the upgrade"
    new_pid=$(service_prop MainPID)
    [ "$new_pid" != "$old_pid" ] || fail "the main PID did not change"
    in_ct sh -c "kill -0 $old_pid" || fail "the old process exited with a live console"
    wait_frames 20
    api /api/v1/stats >/dev/null || fail "the API after the upgrade"
    [ "$(service_prop NRestarts)" = "$restarts" ] || fail "systemd restarted the service during the upgrade: NRestarts $restarts -> $(service_prop NRestarts)"
    touch "$WORK/go"
    wait "$ADMITTED" || fail "the session admitted before the upgrade: $(cat "$WORK/admitted.out")"
    [ "$(cat "$WORK/admitted")" = 10 ] || fail "admitted session: $(cat "$WORK/admitted")"
    step "the old process exits once its last console ends"
    touch "$WORK/stop"
    wait "$CONSOLE" || fail "console: $(cat "$WORK/console.out")"
    CONSOLE=
    until_ok 15 "the old process to exit" sh -c "! nsenter -t $PID1 -a sh -c 'kill -0 $old_pid'"
    in_ct systemctl is-active consolegate >/dev/null || fail "inactive after the old process left"
    [ "$(service_prop MainPID)" = "$new_pid" ] || fail "main PID changed again"
}

deb_test() {
    copy_root "$BASE" "$WORK/deb"
    cp "$DEB_OLD" "$ROOT/srv/old.deb"
    cp "$DEB_NEW" "$ROOT/srv/new.deb"
    boot "$ROOT"

    step "apt install the .deb; the service starts and reports READY"
    in_ct apt-get install -y -q /srv/old.deb >"$WORK/apt-install.log" 2>&1 || { cat "$WORK/apt-install.log"; fail "apt install"; }
    until_ok "$SERVICE_S" "consolegate active" in_ct systemctl is-active consolegate
    [ "$(service_prop Type)" = notify ] || fail "Type=$(service_prop Type)"
    [ "$(service_prop StatusText)" = "listening; workers running" ] || fail "status: $(service_prop StatusText)"
    [ "$(mode_of "$ROOT" /etc/consolegate/consolegate.toml)" = "640 root consolegate" ] || fail "config mode"
    [ "$(mode_of "$ROOT" /etc/consolegate/admin-token)" = "600 root root" ] || fail "token mode"
    [ "$(mode_of "$ROOT" /var/lib/consolegate)" = "750 consolegate consolegate" ] || fail "state dir mode"
    [ "$(service_prop User)" = consolegate ] || fail "User=$(service_prop User)"

    step "the API answers with the generated credential, and only with it"
    api /api/v1/stats >/dev/null || fail "GET /api/v1/stats with the admin token"
    code=$(in_net curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer wrong-token-0123456789' http://127.0.0.1:8080/api/v1/sessions -X POST)
    [ "$code" = 401 ] || fail "a wrong token got $code"
    in_ct journalctl -u consolegate --no-pager | grep -q "demo console started" && fail "the demo console runs"

    stuck_worker_restarts

    step "edit the conffile: TLS on the console port (plain ws allowed), a marker line"
    mkdir -p "$WORK/tls1" "$WORK/tls2"
    cert one "$WORK/tls1"
    cert two "$WORK/tls2"
    install -d -m 0750 -g 0 "$ROOT/etc/consolegate/tls"
    in_ct chgrp consolegate /etc/consolegate/tls
    install -m 0640 "$WORK/tls1/cert.pem" "$WORK/tls1/key.pem" "$ROOT/etc/consolegate/tls/"
    in_ct chgrp consolegate /etc/consolegate/tls/cert.pem /etc/consolegate/tls/key.pem
    cat >>"$ROOT/etc/consolegate/consolegate.toml" <<'TOML'

# local edit by the package test
[tls]
cert = "/etc/consolegate/tls/cert.pem"
key = "/etc/consolegate/tls/key.pem"
allow_plain = true
TOML
    in_ct systemctl restart consolegate
    until_ok "$SERVICE_S" "consolegate active with TLS" in_ct systemctl is-active consolegate
    [ "$(fingerprint)" = "$(openssl x509 -noout -fingerprint -sha256 -in "$WORK/tls1/cert.pem")" ] || fail "not the first certificate"

    step "reload with a live console: it keeps flowing, new handshakes get the new certificate"
    start_console
    pid=$(service_prop MainPID)
    install -m 0640 "$WORK/tls2/cert.pem" "$WORK/tls2/key.pem" "$ROOT/etc/consolegate/tls/"
    in_ct chgrp consolegate /etc/consolegate/tls/cert.pem /etc/consolegate/tls/key.pem
    in_ct systemctl reload consolegate || fail "systemctl reload"
    until_ok 10 "the new certificate presented" \
        sh -c "[ \"\$(nsenter -t $PID1 -n sh -c 'openssl s_client -connect 127.0.0.1:6080 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256')\" = \"$(openssl x509 -noout -fingerprint -sha256 -in "$WORK/tls2/cert.pem")\" ]"
    wait_frames 10
    [ "$(service_prop MainPID)" = "$pid" ] || fail "the reload restarted the process"
    in_ct journalctl -u consolegate --no-pager | grep -q "configuration reloaded" || fail "no reload line"

    step "an invalid config is refused: reload fails, the old one stays, the key is named"
    sed -i 's/^handoff_timeout_ms = .*/handoff_timeout_ms = 5/' "$ROOT/etc/consolegate/consolegate.toml"
    in_ct systemctl reload consolegate 2>/dev/null && fail "reload accepted an invalid config"
    in_ct systemctl kill -s HUP --kill-whom=main consolegate
    until_ok 10 "a 'reload refused' line naming the key" \
        sh -c "nsenter -t $PID1 -a journalctl -u consolegate --no-pager -o verbose | grep -q '^ *CG_KEY=service.handoff_timeout_ms$'"
    in_ct systemctl is-active consolegate >/dev/null || fail "inactive after a refused reload"
    [ "$(service_prop MainPID)" = "$pid" ] || fail "the refused reload restarted the process"
    api /api/v1/stats >/dev/null || fail "the API after a refused reload"
    wait_frames 10
    sed -i 's/^handoff_timeout_ms = .*/handoff_timeout_ms = 30000/' "$ROOT/etc/consolegate/consolegate.toml"

    step "journald: structured session fields"
    in_ct journalctl -u consolegate -o json --no-pager | grep '"CG_USER":"package-test"' | grep -q '"CG_SESSION"' \
        || fail "no session line with CG_SESSION/CG_USER fields"

    step "upgrade to the newer build with a live console: hand-off, the console keeps flowing, the edit survives"
    upgrade_keeps_consoles "$WORK/apt-upgrade.log" \
        apt-get install -y -q -o Dpkg::Options::=--force-confold /srv/new.deb
    new_version=$(dpkg-deb -f "$DEB_NEW" Version)
    [ "$(in_ct dpkg-query -W -f '${Version}' consolegate)" = "$new_version" ] || fail "not upgraded to $new_version"
    grep -q "local edit by the package test" "$ROOT/etc/consolegate/consolegate.toml" || fail "the conffile edit was lost"
    [ "$(mode_of "$ROOT" /etc/consolegate/consolegate.toml)" = "640 root consolegate" ] || fail "config mode after upgrade"

    step "remove keeps the config; purge removes config, token, state, user"
    in_ct apt-get remove -y -q consolegate >/dev/null 2>&1 || fail "apt remove"
    [ -f "$ROOT/etc/consolegate/consolegate.toml" ] || fail "remove deleted the conffile"
    [ ! -e "$ROOT/usr/bin/consolegate" ] || fail "remove left the binary"
    in_ct dpkg --purge consolegate >/dev/null 2>&1 || fail "dpkg --purge"
    [ ! -e "$ROOT/etc/consolegate/consolegate.toml" ] || fail "purge left the conffile"
    [ ! -e "$ROOT/etc/consolegate/admin-token" ] || fail "purge left the token"
    [ ! -e "$ROOT/var/lib/consolegate" ] || fail "purge left the state directory"
    in_ct getent passwd consolegate >/dev/null && fail "purge left the user"
    kill -TERM "$NSPAWN"
    wait "$NSPAWN" 2>/dev/null || true
    NSPAWN= PID1=
    echo "deb test passed"
}

rpm_test() {
    local root=$WORK/rpm
    step "rpm --root install into a copy of the root"
    cp -a "$BASE" "$root"
    rpm --root "$root" --initdb
    # --nodeps: the root's packages are in dpkg's database, not rpm's.
    rpm --root "$root" --nodeps -i "$RPM" || fail "rpm -i"
    grep -q '^consolegate:' "$root/etc/passwd" || fail "%pre made no user"
    [ "$(mode_of "$root" /etc/consolegate/consolegate.toml)" = "640 root consolegate" ] || fail "rpm config mode"
    [ "$(mode_of "$root" /etc/consolegate/admin-token)" = "600 root root" ] || fail "rpm token mode"
    [ "$(mode_of "$root" /var/lib/consolegate)" = "750 consolegate consolegate" ] || fail "rpm state dir"
    for f in usr/bin/consolegate usr/lib/systemd/system/consolegate.service usr/lib/sysusers.d/consolegate.conf \
        usr/lib/tmpfiles.d/consolegate.conf usr/lib/sysctl.d/99-consolegate.conf; do
        [ -e "$root/$f" ] || fail "rpm: /$f missing"
    done
    ls "$root"/usr/share/man/man1/consolegate.1* >/dev/null || fail "rpm: no man page"
    rpm --root "$root" -V --nodeps consolegate || fail "rpm -V after install"
    echo "# local edit" >>"$root/etc/consolegate/consolegate.toml"
    # rpm -V exits non-zero when it finds a change: that is the point here.
    rpm --root "$root" -V --nodeps consolegate >"$WORK/rpm-V.out" 2>&1 || true
    grep -q '^S\.5\.\.\.\.T\.  c /etc/consolegate/consolegate.toml$' "$WORK/rpm-V.out" || fail "rpm -V: $(cat "$WORK/rpm-V.out")"
    # Upgrade: the old package's %postun (no systemd in the copy: no
    # hand-off to do) and the new %post run; the edit and the token stay.
    rpm --root "$root" --nodeps -U "$RPM_NEW" || fail "rpm -U"
    [ "$(rpm --root "$root" -q --qf '%{RELEASE}' consolegate)" = "$(rpm -qp --qf '%{RELEASE}' "$RPM_NEW")" ] || fail "rpm -U: not the new release"
    grep -qx '# local edit' "$root/etc/consolegate/consolegate.toml" || fail "rpm -U lost the config edit"
    [ "$(mode_of "$root" /etc/consolegate/consolegate.toml)" = "640 root consolegate" ] || fail "rpm config mode after -U"
    [ "$(mode_of "$root" /etc/consolegate/admin-token)" = "600 root root" ] || fail "rpm -U: the token is gone or changed mode"
    rpm --root "$root" --nodeps -e consolegate || fail "rpm -e"
    [ -e "$root/etc/consolegate/consolegate.toml.rpmsave" ] || fail "rpm -e dropped the edited config"
    [ ! -e "$root/usr/bin/consolegate" ] || fail "rpm -e left the binary"
    [ ! -e "$root/etc/consolegate/admin-token" ] || fail "rpm -e left the token"
    echo "rpm test passed"
}

# The rpm under systemd: install, upgrade with the hand-off, erase, in a
# booted container (Debian's rpm in a Debian root: no Fedora root to boot).
rpm_systemd_test() {
    copy_root "$RPM_BASE" "$WORK/rpm-systemd"
    cp "$RPM" "$ROOT/srv/old.rpm"
    cp "$RPM_NEW" "$ROOT/srv/new.rpm"
    boot "$ROOT"

    step "rpm -i under systemd, then systemctl enable --now; the service reports READY"
    in_ct rpm --initdb
    # --nodeps: the container's packages are in dpkg's database, not rpm's,
    # so the rpm's Requires (systemd, shadow-utils, coreutils: Fedora's
    # names) cannot be resolved although Debian's systemd, passwd and
    # coreutils are installed. --force-debian: Debian's rpm otherwise warns
    # that rpm should not install packages on a Debian system.
    in_ct rpm -i --nodeps --force-debian /srv/old.rpm >"$WORK/rpm-install.log" 2>&1 || { cat "$WORK/rpm-install.log"; fail "rpm -i"; }
    # As on Fedora, installing an rpm starts nothing (%systemd_post presets).
    in_ct systemctl enable --now consolegate >>"$WORK/rpm-install.log" 2>&1 || { cat "$WORK/rpm-install.log"; fail "systemctl enable --now"; }
    until_ok "$SERVICE_S" "consolegate active (rpm)" in_ct systemctl is-active consolegate
    [ "$(service_prop StatusText)" = "listening; workers running" ] || fail "rpm: status: $(service_prop StatusText)"
    [ "$(service_prop User)" = consolegate ] || fail "rpm: User=$(service_prop User)"
    [ "$(mode_of "$ROOT" /etc/consolegate/admin-token)" = "600 root root" ] || fail "rpm: token mode"
    api /api/v1/stats >/dev/null || fail "rpm: GET /api/v1/stats with the admin token"

    step "rpm -U with a live console: the old package's %postun hands over"
    start_console
    upgrade_keeps_consoles "$WORK/rpm-upgrade.log" rpm -U --nodeps --force-debian /srv/new.rpm
    [ "$(in_ct rpm -q --qf '%{RELEASE}' consolegate)" = "$(rpm -qp --qf '%{RELEASE}' "$RPM_NEW")" ] || fail "rpm -U: not the new release"
    [ "$(mode_of "$ROOT" /etc/consolegate/admin-token)" = "600 root root" ] || fail "rpm -U: the token is gone or changed mode"

    step "rpm -e stops and disables the service, removes the files and the token"
    in_ct rpm -e --nodeps consolegate >"$WORK/rpm-erase.log" 2>&1 || { cat "$WORK/rpm-erase.log"; fail "rpm -e"; }
    in_ct systemctl is-active consolegate >/dev/null && fail "active after rpm -e"
    [ "$(http_code /healthz)" = 000 ] || fail "something still answers on the control port after rpm -e"
    [ ! -e "$ROOT/usr/bin/consolegate" ] || fail "rpm -e left the binary"
    [ ! -e "$ROOT/etc/consolegate/admin-token" ] || fail "rpm -e left the token"
    kill -TERM "$NSPAWN"
    wait "$NSPAWN" 2>/dev/null || true
    NSPAWN= PID1=
    echo "rpm test under systemd passed"
}

exposure
base_root
case ${ONLY:-all} in
all) rpm_test; deb_test; rpm_root; rpm_systemd_test ;;
deb) deb_test ;;
rpm) rpm_test ;;
rpm-systemd) rpm_root; rpm_systemd_test ;;
*) fail "ONLY=$ONLY: deb, rpm or rpm-systemd" ;;
esac
echo "install tests passed"
