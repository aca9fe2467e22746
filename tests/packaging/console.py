#!/usr/bin/env python3
"""A live console for the package tests: an echo server stands in for the VM's
VNC server (the appliance relays a target without a VNC password unchanged),
a WebSocket client opens a session through the appliance and sends a binary
frame every PERIOD_S seconds, checking each echo.

  console.py CONTROL_URL TOKEN_FILE STATUS_FILE STOP_FILE
  console.py --admit-only CONTROL_URL TOKEN_FILE STATUS_FILE GO_FILE

Writes the count of echoed frames to STATUS_FILE after each one; exits 0 when
STOP_FILE appears and every frame came back within STALL_S, else 1 with the
reason. --admit-only creates the session, writes "admitted" to STATUS_FILE,
waits for GO_FILE (an upgrade happens meanwhile), then connects and checks
ten echoes: an admitted, not yet connected session survives the hand-off. Standard library only (it runs inside the container's network
namespace with the host's python3)."""
import base64, json, os, socket, ssl, struct, sys, threading, time, urllib.request

PERIOD_S = 0.1
STALL_S = 5.0
ORIGIN = "http://console-test.invalid"


def echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=pump, args=(conn,), daemon=True).start()

    def pump(conn):
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def open_session(control, token, port):
    body = json.dumps({"target": {"kind": "vnc", "host": "127.0.0.1", "port": port},
                       "user": "package-test", "ttl_s": 60, "origin": ORIGIN}).encode()
    req = urllib.request.Request(control + "/api/v1/sessions", data=body, method="POST",
                                 headers={"Authorization": "Bearer " + token,
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["ws_url"]


def ws_connect(url):
    tls = url.startswith("wss://")
    assert tls or url.startswith("ws://"), url
    hostport, _, path = url.split("://", 1)[1].partition("/")
    host, _, port = hostport.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=STALL_S)
    if tls:
        # The test's throw-away self-signed certificates: the check that
        # matters (which certificate new handshakes get) is the shell's.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s = ctx.wrap_socket(s, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n"
               f"Origin: {ORIGIN}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise SystemExit("console: the appliance closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit("console: upgrade refused: " + head.decode(errors="replace"))
    return s


def send_frame(s, payload):
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    s.sendall(struct.pack("!BB", 0x82, 0x80 | len(payload)) + mask + masked)


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise SystemExit("console: connection closed by the appliance")
        out += chunk
    return out


def recv_frame(s):
    b0, b1 = recv_exact(s, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", recv_exact(s, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", recv_exact(s, 8))[0]
    payload = recv_exact(s, n)
    op = b0 & 0x0F
    if op == 0x8:
        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 0
        raise SystemExit(f"console: closed by the appliance with {code}")
    return op, payload


def write_status(status_file, text):
    with open(status_file + ".tmp", "w") as f:
        f.write(text)
    os.replace(status_file + ".tmp", status_file)


def main():
    admit_only = sys.argv[1] == "--admit-only"
    args = sys.argv[2:] if admit_only else sys.argv[1:]
    control, token_file, status_file, stop_file = args[:4]
    token = open(token_file).read().strip()
    url = open_session(control, token, echo_server())
    if admit_only:
        write_status(status_file, "admitted")
        deadline = time.time() + 300
        while not os.path.exists(stop_file):
            if time.time() > deadline:
                raise SystemExit("console: no go within 300 s")
            time.sleep(0.1)
    s = ws_connect(url)
    count = 0
    while not os.path.exists(stop_file) or (admit_only and count < 10):
        if admit_only and count >= 10:
            break
        payload = b"frame-%08d" % count
        send_frame(s, payload)
        got = b""
        while got != payload:
            op, data = recv_frame(s)
            if op == 0x9:  # ping: answer it
                mask = os.urandom(4)
                s.sendall(struct.pack("!BB", 0x8A, 0x80 | len(data)) + mask
                          + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
                continue
            got += data
            if not payload.startswith(got):
                raise SystemExit(f"console: echo {got!r} for {payload!r}")
        count += 1
        write_status(status_file, str(count))
        time.sleep(PERIOD_S)
    print(f"console: {count} frames echoed, none lost")


if __name__ == "__main__":
    try:
        main()
    except socket.timeout:
        raise SystemExit(f"console: no echo within {STALL_S} s")
