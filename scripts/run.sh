#!/usr/bin/env bash
# `make run`: the appliance on its built-in default (no config file needed):
# console on 127.0.0.1:6080 (noVNC served there), control API on
# 127.0.0.1:8080, the built-in demo VNC console, an admin token generated at
# start. Once it is up, this script creates one demo session with that
# token and prints the URL that opens it. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/consolegate

if [ ! -f /usr/share/novnc/vnc.html ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing novnc ..."
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q novnc >/dev/null
    else
        echo "noVNC is missing (the console works without it, but there is no page to open):" >&2
        echo "  sudo apt-get install novnc" >&2
    fi
fi

out=$(mktemp)
trap 'rm -f "$out"; [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
"$BIN" run "$@" > >(tee "$out") &
PID=$!

token="" control=""
for _ in $(seq 1 100); do
    token=$(sed -n 's/^admin token: //p' "$out" | head -1)
    control=$(sed -n 's/^control listening on //p' "$out" | head -1)
    [ -n "$control" ] && break
    kill -0 "$PID" 2>/dev/null || exit 1
    sleep 0.1
done
if [ -n "$control" ] && [ -n "$token" ]; then
    # python3 rather than curl: a fresh Debian may not have curl.
    resp=$(CONTROL="$control" TOKEN="$token" python3 - <<'PY' 2>/dev/null || true
import json, os, urllib.request
req = urllib.request.Request(
    "http://%s/api/v1/sessions" % os.environ["CONTROL"],
    data=json.dumps({"target": {"kind": "demo"}, "user": "demo", "ttl_s": 3600}).encode(),
    headers={"Authorization": "Bearer " + os.environ["TOKEN"], "Content-Type": "application/json"},
)
print(urllib.request.urlopen(req, timeout=10).read().decode())
PY
)
    viewer=$(printf '%s' "$resp" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("viewer_url",""))' 2>/dev/null || true)
    echo
    echo "  Demo console (single use, valid for an hour): ${viewer:-$resp}"
    echo "  Another session:"
    echo "    curl -s -X POST http://$control/api/v1/sessions -H 'Authorization: Bearer $token' \\"
    echo "         -H 'Content-Type: application/json' -d '{\"target\":{\"kind\":\"demo\"},\"user\":\"me\"}'"
    echo
fi
wait "$PID"
