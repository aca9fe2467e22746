//! A minimal X11 client, enough to paint a known picture onto an Xvnc
//! display's root window, so that a test knows exactly which pixels the VNC
//! server sends: the core protocol over the display's Unix socket
//! (`/tmp/.X11-unix/X<display>`; the test's Xvnc runs without `-auth`, so a
//! local client needs no credentials), `CreateGC`, `ChangeGC` (foreground),
//! `PolyFillRectangle`, and `GetInputFocus` as a round trip that proves the
//! server has carried out everything before it.
//!
//! It speaks only what it needs and checks what it relies on: a TrueColor
//! root visual with 8 bits per channel (pixel value = 0xRRGGBB).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// One filled rectangle: x, y, width, height, colour as 0xRRGGBB.
pub type Fill = (i16, i16, u16, u16, u32);

/// Bound on each read and write of the connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// X11 opcodes used here.
const CREATE_GC: u8 = 55;
const CHANGE_GC: u8 = 56;
const POLY_FILL_RECTANGLE: u8 = 70;
const GET_INPUT_FOCUS: u8 = 43;
/// GC value-mask bit of the foreground pixel.
const GC_FOREGROUND: u32 = 0x4;
/// Visual class TrueColor.
const TRUE_COLOR: u8 = 4;

/// What the connection setup told us.
#[derive(Debug)]
struct Screen {
    root: u32,
    width: u16,
    height: u16,
    resource_base: u32,
}

/// Paints `fills`, in order, onto the root window of X display `display`,
/// and returns once the server has done so. Panics (naming the display)
/// on any refusal or protocol error.
pub fn fill_root(display: u32, fills: &[Fill]) {
    let path = format!("/tmp/.X11-unix/X{display}");
    let mut s = UnixStream::connect(&path).unwrap_or_else(|e| panic!("connect {path}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let screen = setup(&mut s, display);
    for &(x, y, w, h, _) in fills {
        let inside = x >= 0
            && y >= 0
            && x as u32 + w as u32 <= screen.width as u32
            && y as u32 + h as u32 <= screen.height as u32;
        assert!(
            inside,
            ":{display}: rectangle {x},{y} {w}x{h} outside the {}x{} screen",
            screen.width, screen.height
        );
    }
    let gc = screen.resource_base | 1;
    let mut req = Vec::new();
    // CreateGC with a foreground, then per fill: ChangeGC + PolyFillRectangle.
    push_request(
        &mut req,
        CREATE_GC,
        &[gc, screen.root, GC_FOREGROUND, 0],
        &[],
    );
    for &(x, y, w, h, rgb) in fills {
        push_request(&mut req, CHANGE_GC, &[gc, GC_FOREGROUND, rgb], &[]);
        let mut rect = Vec::with_capacity(8);
        rect.extend_from_slice(&x.to_le_bytes());
        rect.extend_from_slice(&y.to_le_bytes());
        rect.extend_from_slice(&w.to_le_bytes());
        rect.extend_from_slice(&h.to_le_bytes());
        push_request(&mut req, POLY_FILL_RECTANGLE, &[screen.root, gc], &rect);
    }
    push_request(&mut req, GET_INPUT_FOCUS, &[], &[]);
    s.write_all(&req)
        .unwrap_or_else(|e| panic!(":{display}: sending the drawing: {e}"));
    // Errors (first byte 0) arrive before the reply of the last request.
    let mut packet = [0u8; 32];
    s.read_exact(&mut packet)
        .unwrap_or_else(|e| panic!(":{display}: waiting for the round trip: {e}"));
    match packet[0] {
        1 => {}
        0 => panic!(
            ":{display}: X error {} (request opcode {}) while drawing",
            packet[1], packet[10]
        ),
        other => panic!(":{display}: unexpected X packet type {other} while drawing"),
    }
}

/// One request: opcode, 32-bit words, then raw bytes (a multiple of 4).
fn push_request(out: &mut Vec<u8>, opcode: u8, words: &[u32], tail: &[u8]) {
    assert_eq!(tail.len() % 4, 0, "X11 request tail must be padded");
    let len = 1 + words.len() + tail.len() / 4;
    out.push(opcode);
    out.push(0);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(tail);
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Connection setup (little-endian, protocol 11.0, no authorisation);
/// returns the first screen, after checking its root visual.
fn setup(s: &mut UnixStream, display: u32) -> Screen {
    let mut hello = vec![b'l', 0];
    hello.extend_from_slice(&11u16.to_le_bytes());
    hello.extend_from_slice(&0u16.to_le_bytes());
    hello.extend_from_slice(&[0; 6]); // no auth name or data, padding
    s.write_all(&hello)
        .unwrap_or_else(|e| panic!(":{display}: X setup: {e}"));
    let mut head = [0u8; 8];
    s.read_exact(&mut head)
        .unwrap_or_else(|e| panic!(":{display}: X setup reply: {e}"));
    let mut data = vec![0u8; u16_at(&head, 6) as usize * 4];
    s.read_exact(&mut data)
        .unwrap_or_else(|e| panic!(":{display}: X setup data: {e}"));
    if head[0] != 1 {
        let reason = data.get(..head[1] as usize).unwrap_or(&data);
        panic!(
            ":{display}: the X server refused the connection: {}",
            String::from_utf8_lossy(reason)
        );
    }
    let resource_base = u32_at(&data, 4);
    let vendor_len = u16_at(&data, 16) as usize;
    let formats = data[21] as usize;
    let screen_at = 32 + vendor_len.div_ceil(4) * 4 + 8 * formats;
    let sc = &data[screen_at..];
    let screen = Screen {
        root: u32_at(sc, 0),
        width: u16_at(sc, 20),
        height: u16_at(sc, 22),
        resource_base,
    };
    let root_visual = u32_at(sc, 32);
    let root_depth = sc[38];
    let depths = sc[39] as usize;
    // Depths follow the 40-byte screen: depth, pad, visual count, pad(4),
    // then 24-byte visuals.
    let mut at = 40;
    for _ in 0..depths {
        let visuals = u16_at(sc, at + 2) as usize;
        for v in 0..visuals {
            let vis = &sc[at + 8 + 24 * v..];
            if u32_at(vis, 0) == root_visual {
                let masks = (u32_at(vis, 8), u32_at(vis, 12), u32_at(vis, 16));
                assert!(
                    vis[4] == TRUE_COLOR && masks == (0xff_0000, 0xff00, 0xff) && root_depth == 24,
                    ":{display}: root visual is not 24-bit TrueColor RGB (class {}, masks {masks:x?}, depth {root_depth})",
                    vis[4]
                );
                return screen;
            }
        }
        at += 8 + 24 * visuals;
    }
    panic!(":{display}: root visual {root_visual:#x} not listed in the setup");
}
