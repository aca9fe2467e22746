#!/usr/bin/env python3
"""Writes the hand-made seed corpora under fuzz/corpus/<target>/.

Each seed is a realistic input in the layout its target documents (a short
header of fuzzing parameters, then real protocol bytes), so the fuzzer starts
from traffic that reaches deep into the parsers. Re-run after changing a
target's input layout:

    python3 fuzz/make_seeds.py

The files are committed; the corpora a fuzzing run grows go elsewhere
(fuzz/work/, gitignored), except a minimised selection of what a long run
found, committed in fuzz/corpus/<target>/grown/, which this script keeps.
Standard library only.
"""

import base64
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
REPO = os.path.dirname(HERE)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def write(target, name, data):
    folder = os.path.join(CORPUS, target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def fresh(target):
    """Remove the target's seed files, keeping its grown/ folder."""
    folder = os.path.join(CORPUS, target)
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)


# ---- http_upgrade: max_request_bytes (u16 LE), max_headers, prefix_cut, request


def http(max_bytes=8192, max_headers=48, cut=128):
    return struct.pack("<HBB", max_bytes, max_headers, cut)


def upgrade(path="/websockify?token=abc123", extra=""):
    return (
        f"GET {path} HTTP/1.1\r\n"
        "Host: console.example.com:6080\r\n"
        "Upgrade: websocket\r\n"
        "Connection: keep-alive, Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    )


def seeds_http():
    t = "http_upgrade"
    fresh(t)
    write(t, "novnc", http() + upgrade().encode())
    write(
        t,
        "wmks",
        http()
        + upgrade(
            "/proxy/00ab12cd34ef5678?token=k%2Fq%2B%3D%3D",
            "Origin: https://portal.example.com\r\n"
            "Sec-WebSocket-Protocol: binary, vmware-vvc\r\n"
            "User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n",
        ).encode(),
    )
    write(
        t,
        "websockify_base64",
        http() + upgrade("/?token=vm+101&x=%zz", "Sec-WebSocket-Protocol: base64\r\n").encode(),
    )
    write(
        t,
        "forwarded",
        http()
        + upgrade(
            "/ws",
            "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 192.0.2.7, ::1\r\n"
            "upgrade: WebSocket\r\nSec-WebSocket-Protocol: chat\r\n",
        ).encode(),
    )
    # A client that pipelines its first frame right after the head.
    write(t, "pipelined", http() + upgrade().encode() + b"\x82\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")
    write(t, "static_get", http() + b"GET /vnc.html?autoconnect=1#frag HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n")
    write(t, "head_10", http() + b"HEAD /core/rfb.js HTTP/1.0\r\n\r\n")
    write(t, "post_body", http() + b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    write(t, "chunked", http() + b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    write(t, "tls_hello", http() + b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    write(t, "too_small", http(64, 4, 10) + upgrade().encode())
    write(t, "http2", http() + b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    write(t, "bad_version", http() + upgrade("/", "Sec-WebSocket-Version: 8\r\n").encode())


# ---- WebSocket frames


def client_frame(payload, opcode=0x2, fin=True, mask=b"\x37\xfa\x21\x3d", form=None):
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if form is None:
        form = 7 if n < 126 else 16 if n < 65536 else 64
    if form == 7:
        head = bytes([b0, 0x80 | n])
    elif form == 16:
        head = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def decoder_header(base64_mode=False, limit=6, chunks=(255,) * 8, outs=(255,) * 8):
    flags = (1 if base64_mode else 0) | (limit << 1)
    return bytes([flags]) + bytes(chunks) + bytes(outs)


SMALL_CHUNKS = (1, 2, 3, 5, 8, 13, 21, 255)
SMALL_OUTS = (0, 1, 2, 3, 7, 16, 64, 0xFF)


def seeds_decoder():
    t = "websocket_decoder"
    fresh(t)
    # noVNC: a ClientInit, SetEncodings and pointer events as binary frames.
    stream = (
        client_frame(b"\x01")
        + client_frame(b"\x02\x00\x00\x03\x00\x00\x00\x07\x00\x00\x00\x01\xff\xff\xff\x21")
        + client_frame(b"\x05\x00\x01\x40\x00\xf0")
        + client_frame(b"\x09\x00", opcode=0x9)
        + client_frame(b"\x03\xe8bye", opcode=0x8)
    )
    write(t, "novnc_raw", decoder_header() + stream)
    write(t, "novnc_raw_chunked", decoder_header(chunks=SMALL_CHUNKS, outs=SMALL_OUTS) + stream)
    # A fragmented text message with a ping in the middle, split in UTF-8.
    text = "héllo wörld €".encode()
    frag = (
        client_frame(text[:2], opcode=0x1, fin=False)
        + client_frame(b"hi", opcode=0x9)
        + client_frame(text[2:9], opcode=0x0, fin=False)
        + client_frame(text[9:], opcode=0x0)
        + client_frame(b"", opcode=0xA)
    )
    write(t, "fragmented_text", decoder_header(chunks=SMALL_CHUNKS, outs=SMALL_OUTS) + frag)
    big = bytes(range(256)) * 2
    write(t, "len16", decoder_header(chunks=(255, 7, 255, 1, 255, 3, 255, 0), outs=SMALL_OUTS) + client_frame(big))
    write(t, "len64_nonminimal", decoder_header() + client_frame(b"abc", form=64) + client_frame(b"", form=16))
    write(t, "too_big", decoder_header(limit=2) + client_frame(b"x" * 200))
    # websockify's base64 subprotocol: text frames of base64.
    b64 = (
        client_frame(base64.b64encode(b"\x01"), opcode=0x1)
        + client_frame(base64.b64encode(b"\x03\x01\x00\x00\x00\x00\x04\x00\x03\x00")[:5], opcode=0x1, fin=False)
        + client_frame(base64.b64encode(b"\x03\x01\x00\x00\x00\x00\x04\x00\x03\x00")[5:], opcode=0x0)
        + client_frame(b"\x03\xe8", opcode=0x8)
    )
    write(t, "base64", decoder_header(True) + b64)
    write(t, "base64_chunked", decoder_header(True, chunks=SMALL_CHUNKS, outs=SMALL_OUTS) + b64)
    write(t, "base64_bad", decoder_header(True) + client_frame(b"aGVsbG8=aGk=", opcode=0x1))
    # Protocol errors: unmasked, reserved bits, reserved opcode, bad close.
    write(t, "unmasked", decoder_header() + b"\x82\x03abc")
    write(t, "reserved_bits", decoder_header() + client_frame(b"x", opcode=0x42))
    write(t, "reserved_opcode", decoder_header() + client_frame(b"x", opcode=0x3))
    write(t, "close_bad_code", decoder_header() + client_frame(b"\x03\xedx", opcode=0x8))
    write(t, "close_bad_utf8", decoder_header() + client_frame(b"\x03\xe8\xff", opcode=0x8))
    write(t, "text_bad_utf8", decoder_header() + client_frame(b"ok\xc3", opcode=0x1))


# ---- websocket_roundtrip: flags, mask seed, chunks, outs, then records


def roundtrip_header(base64_mode=False, chunks=(255,) * 8, outs=(255,) * 8):
    return bytes([1 if base64_mode else 0]) + b"\x37\xfa\x21\x3d" + bytes(chunks) + bytes(outs)


def record(kind, payload):
    return bytes([kind]) + struct.pack("<H", len(payload)) + payload


MESSAGE, SERVER_HEADER, TEXT, FRAGMENTED, PING, PONG, CLOSE, WRONG = range(8)


def seeds_roundtrip():
    t = "websocket_roundtrip"
    fresh(t)
    session = (
        record(MESSAGE, b"\x01")
        + record(SERVER_HEADER, b"\x02\x00\x00\x02\x00\x00\x00\x07\x00\x00\x00\x01")
        + record(PING, b"keepalive")
        + record(TEXT, "clipboard: héllo".encode())
        + record(FRAGMENTED, b"\x1b\x40\x80\xc0" + bytes(range(64)))
        + record(PONG, b"")
        + record(CLOSE, b"\x03\xe8normal closure")
    )
    write(t, "session_raw", roundtrip_header() + session)
    write(t, "session_raw_chunked", roundtrip_header(chunks=SMALL_CHUNKS, outs=SMALL_OUTS) + session)
    write(t, "session_base64", roundtrip_header(True, chunks=SMALL_CHUNKS, outs=SMALL_OUTS) + session)
    write(t, "large", roundtrip_header() + record(SERVER_HEADER, bytes(300)) + record(MESSAGE, b"\xff" * 5000))
    write(t, "close_bad_code", roundtrip_header() + record(MESSAGE, b"x") + record(CLOSE, b"\x03\xed"))
    write(t, "close_long_reason", roundtrip_header() + record(CLOSE, b"\x0f\xa0" + "é".encode() * 80))
    write(t, "wrong_direction", roundtrip_header() + record(PING, b"a") + record(WRONG, b"b"))
    write(t, "after_close", roundtrip_header() + record(CLOSE, b"\x03\xe9") + record(MESSAGE, b"ignored"))


# ---- rfb_handshake: flags, password_len, password[12], then (side, len, bytes)

BACKEND, BROWSER = 0, 1


def rfb_header(password=None, reason_limit=5, early_limit=5):
    flags = (1 if password is not None else 0) | (reason_limit << 1) | (early_limit << 4)
    pw = (password or b"").ljust(12, b"\0")[:12]
    return bytes([flags, len(password or b"")]) + pw


def step(side, data):
    out = b""
    # One step carries at most 255 bytes.
    for i in range(0, max(len(data), 1), 255):
        chunk = data[i : i + 255]
        out += bytes([side, len(chunk)]) + chunk
    return out


CHALLENGE = bytes(range(0x10, 0x20))
V38, V37, V33 = b"RFB 003.008\n", b"RFB 003.007\n", b"RFB 003.003\n"
U32 = lambda n: struct.pack(">I", n)


def seeds_rfb():
    t = "rfb_handshake"
    fresh(t)
    write(
        t,
        "none_38",
        rfb_header()
        + step(BACKEND, V38)
        + step(BROWSER, V38)
        + step(BACKEND, b"\x01\x01")
        + step(BROWSER, b"\x01")
        + step(BACKEND, U32(0))
        + step(BROWSER, b"\x01")
        + step(BACKEND, b"\x04\x00\x03\x00\x20\x18\x00\x01\x00\xff\x00\xff\x00\xff\x10\x08\x00\x00\x00\x00\x00\x00\x00\x04QEMU"),
    )
    write(
        t,
        "vncauth_38",
        rfb_header(b"secret")
        + step(BACKEND, V38)
        + step(BACKEND, b"\x02\x01\x02")
        + step(BROWSER, V38 + b"\x01")
        + step(BACKEND, CHALLENGE)
        + step(BACKEND, U32(0))
        + step(BROWSER, b"\x00"),
    )
    write(
        t,
        "vncauth_33_browser_37",
        rfb_header(b"longpassword")
        + step(BACKEND, V33 + U32(2) + CHALLENGE[:5])
        + step(BROWSER, V37)
        + step(BACKEND, CHALLENGE[5:] + U32(0))
        + step(BROWSER, b"\x01\x01"),
    )
    write(
        t,
        "browser_33",
        rfb_header() + step(BROWSER, V33) + step(BACKEND, V37 + b"\x01\x01") + step(BROWSER, b"\x01"),
    )
    # Every byte on its own, alternating sides.
    interleaved = b""
    back = V38 + b"\x01\x02" + CHALLENGE + U32(0)
    brow = V38 + b"\x01\x01"
    for i in range(max(len(back), len(brow))):
        if i < len(back):
            interleaved += step(BACKEND, back[i : i + 1])
        if i < len(brow):
            interleaved += step(BROWSER, brow[i : i + 1])
    write(t, "byte_by_byte", rfb_header(b"pw") + interleaved)
    reason = b"Authentication failed"
    write(
        t,
        "auth_failed",
        rfb_header(b"wrong")
        + step(BROWSER, V38 + b"\x01")
        + step(BACKEND, V38 + b"\x01\x02" + CHALLENGE + U32(1) + U32(len(reason)) + reason),
    )
    refused = b"Too many security failures"
    write(t, "refused", rfb_header() + step(BACKEND, V38 + b"\x00" + U32(len(refused)) + refused) + step(BROWSER, V38))
    write(t, "no_common", rfb_header() + step(BROWSER, V38) + step(BACKEND, V38 + b"\x03\x10\x13\x12"))
    # A browser that pipelines ClientInit and its first messages early.
    write(
        t,
        "early_browser",
        rfb_header(b"pw", early_limit=3)
        + step(BROWSER, V38 + b"\x01\x01" + b"\x02\x00\x00\x01\x00\x00\x00\x00" + b"\x03\x00\x00\x00\x00\x00\x04\x00\x03\x00")
        + step(BACKEND, V38 + b"\x01\x02" + CHALLENGE + U32(0)),
    )
    write(t, "not_rfb", rfb_header() + step(BACKEND, b"SSH-2.0-OpenSSH_9.2\r\n") + step(BROWSER, b"GET / HTTP/1.1\r\n"))
    write(t, "version_4", rfb_header() + step(BACKEND, b"RFB 004.001\n\x01\x01" + U32(0)) + step(BROWSER, b"RFB 003.889\n\x01\x01"))


# ---- control_json: the body


def seeds_control_json():
    t = "control_json"
    fresh(t)
    write(
        t,
        "full",
        '{"target":{"kind":"vnc","host":"10.0.0.5","port":5901,"password":"s3cret"},'
        '"user":"alice","vm_id":"vm-101","ttl_s":60,"port_mode":"dedicated",'
        '"origin":"https://portal.example.com","client_ip":"192.0.2.7"}',
    )
    write(t, "demo", '{"target": {"kind": "demo"}, "user": "bob"}\n')
    write(
        t,
        "ipv6",
        '{"user":"u\\u00e9\\ud83d\\ude00","target":{"kind":"vnc","host":"::1","port":5900},'
        '"client_ip":"::ffff:10.0.0.1","port_mode":"shared","vm_id":null,"ttl_s":3600}',
    )
    write(t, "target_only", '{"kind":"vnc","host":"localhost","port":65535}')
    write(t, "unknown_field", '{"target":{"kind":"vnc"},"user":"x","admin":true}')
    write(t, "wrong_types", '{"target":{"kind":"vnc","port":70000},"user":1,"ttl_s":-1}')
    write(t, "deep", "[" * 200 + "]" * 200)


# ---- config: TOML, then NUL and NAME=VALUE lines


def seeds_config():
    t = "config"
    fresh(t)
    # The packaged file without its comments: the keys and values are what
    # the parser sees, and a short seed keeps the fuzzer fast.
    with open(os.path.join(REPO, "packaging", "consolegate.toml")) as f:
        lines = [l for l in f if l.strip() and not l.lstrip().startswith("#")]
    write(t, "packaged", "".join(lines))
    write(
        t,
        "small",
        '[control]\nlisten = "127.0.0.1:9090"\n\n[console]\nlisten = "[::]:6080"\n'
        'public_url = "wss://console.example.com/"\n\n[ports]\nrange = "6100-6199"\n\n'
        '[[auth.tokens]]\ntoken = "0123456789abcdef0123456789abcdef"\nrole = "admin"\n',
    )
    write(t, "empty", "")
    write(t, "tls", '[tls]\ncert = "/etc/consolegate/cert.pem"\nkey = "/etc/consolegate/key.pem"\n')
    write(
        t,
        "env",
        '[dataplane]\nworkers = 2\n\x00CONSOLEGATE_CONTROL_LISTEN=127.0.0.1:9\n'
        "CONSOLEGATE_DATAPLANE_LIMITS_IDLE_TIMEOUT_MS=600000\n"
        "CONSOLEGATE_AUTH_TOKEN=abcdefabcdefabcdefabcdefabcdefab\nCONSOLEGATE_TLS_CERT=/c.pem\n",
    )
    write(t, "env_bad", "\x00CONSOLEGATE_NO_SUCH_KEY=1\nCONSOLEGATE_DATAPLANE_WORKERS=many\n")
    write(t, "bad_range", '[ports]\nrange = "7000-6000"\n[control]\nmax_request_bytes = 10\n')
    write(t, "unknown_key", "[control]\nlisten = 5\nnope = true\n")


# ---- token_file: flags (max_tokens choice), then the file


def seeds_token_file():
    t = "token_file"
    fresh(t)
    write(
        t,
        "websockify",
        b"\x03# websockify token file\nvm-101: 10.0.0.5:5901\nvm-102 : [fd00::7]:5900\n"
        b"vm-103:localhost:5903\nvm-104: fd00::8:5904\n\n",
    )
    write(t, "crlf_bom", b"\x03\xef\xbb\xbfa: host.example:1\r\nb: 127.0.0.1:65535\r\n# c: x:1\r\n")
    write(t, "bad_lines", b"\x03ok: h:1\nno separator\n: h:1\nx: h:0\nx: [::1\nu: unix_socket:/tmp/s\nx: h h:5\n")
    write(t, "duplicates", b"\x01a: h:1\na: h:2\nb: h:3\n")
    write(t, "colon_token", b"\x03a:b: h:1\nc:d:e\n")


def main():
    seeds_http()
    seeds_decoder()
    seeds_roundtrip()
    seeds_rfb()
    seeds_control_json()
    seeds_config()
    seeds_token_file()


if __name__ == "__main__":
    main()
