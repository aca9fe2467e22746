#!/usr/bin/env bash
# `make run`: until the appliance mode lands, start `consolegate proxy` in
# front of a local Xvnc that this script starts itself, serve noVNC on the
# same port, and print the URL to open. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

LISTEN="${LISTEN:-127.0.0.1:6080}"
IO="${IO:-auto}"
BIN=target/release/consolegate

need=()
command -v Xvnc >/dev/null || need+=(tigervnc-standalone-server)
[ -f /usr/share/novnc/vnc.html ] || need+=(novnc)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing ${need[*]} ..."
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
    else
        echo "missing: ${need[*]} — install with: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi

# A free loopback port for the VNC server.
VNC_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
tmp=$(mktemp -d)
cleanup() {
    [ -n "${XVNC_PID:-}" ] && kill "$XVNC_PID" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

# -displayfd lets Xvnc pick a free display number and tell us.
exec 3>"$tmp/display"
Xvnc -displayfd 3 -rfbport "$VNC_PORT" -localhost -interface 127.0.0.1 \
     -SecurityTypes None -geometry 1024x768 -depth 24 -retro \
     -desktop "consolegate demo" >"$tmp/xvnc.log" 2>&1 &
XVNC_PID=$!
exec 3>&-
for _ in $(seq 1 100); do
    if (exec 9<>"/dev/tcp/127.0.0.1/$VNC_PORT") 2>/dev/null; then break; fi
    kill -0 "$XVNC_PID" 2>/dev/null || { cat "$tmp/xvnc.log" >&2; exit 1; }
    sleep 0.1
done
echo "Xvnc on 127.0.0.1:$VNC_PORT"

host=${LISTEN%:*}; port=${LISTEN##*:}
echo
echo "  Open: http://$host:$port/vnc.html?autoconnect=true&resize=scale&path=websockify"
echo
"$BIN" proxy --io "$IO" --web /usr/share/novnc "$LISTEN" "127.0.0.1:$VNC_PORT"
