//! One benchmark client session: a blocking TCP connection speaking either raw
//! bytes (direct TCP, plain relay) or WebSocket (websockify, consolegate), with
//! a closed-loop `round_trip` that sends one message and waits for all of its
//! echo.
//!
//! All buffers are allocated in `connect`; `round_trip` allocates nothing and
//! checks that the echo is byte-for-byte what was sent (a proxy that corrupts,
//! reorders or drops data fails the run instead of producing a fast number).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::wsproto::{self, FrameError, UpgradeResponse};

/// Largest message a session sends; bounds every per-session buffer.
pub const MAX_MESSAGE_BYTES: usize = 60 * 1024;

/// Receive buffer: one maximal server frame plus its header.
const RX_BUF_BYTES: usize = wsproto::MAX_RX_PAYLOAD as usize + 16;

/// Longest HTTP response to the upgrade we accept.
const MAX_UPGRADE_RESPONSE_BYTES: usize = 16 * 1024;

/// What the client speaks to the server under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Raw bytes: the message goes out as-is and comes back as-is.
    Raw,
    /// WebSocket: HTTP upgrade, then one masked binary frame per message; the
    /// echo may come back split over several frames.
    WebSocket {
        path: String,
        subprotocol: Option<String>,
    },
}

#[derive(Debug)]
pub enum ClientError {
    Connect(io::Error),
    Io(io::Error),
    Handshake(String),
    Frame(FrameError),
    /// The peer closed the TCP connection or sent a Close frame.
    Closed(String),
    /// The echo did not match what was sent.
    Mismatch {
        seq: u64,
    },
    /// A text frame, or more data than was sent.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(e) => write!(f, "connect: {e}"),
            ClientError::Io(e) => write!(f, "io: {e}"),
            ClientError::Handshake(m) => write!(f, "websocket handshake: {m}"),
            ClientError::Frame(e) => write!(f, "websocket frame: {e}"),
            ClientError::Closed(m) => write!(f, "closed by peer: {m}"),
            ClientError::Mismatch { seq } => write!(f, "echo of message {seq} differs"),
            ClientError::Protocol(m) => write!(f, "protocol: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        ClientError::Frame(e)
    }
}

/// xorshift64*: mask keys and handshake keys. A benchmark needs unpredictable
/// enough, not cryptographic, masks.
struct Rng(u64);

impl Rng {
    fn seeded(salt: u64) -> Rng {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        h.write_u64(nanos);
        Rng(h.finish() | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn next_mask(&mut self) -> [u8; 4] {
        let b = self.next_u64().to_le_bytes();
        [b[0], b[1], b[2], b[3]]
    }
}

pub struct Session {
    stream: TcpStream,
    websocket: bool,
    id: u16,
    seq: u64,
    rng: Rng,
    msg: Vec<u8>,
    echo: Vec<u8>,
    tx: Vec<u8>,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
}

impl Session {
    /// Connects (TCP_NODELAY, read/write timeouts of `io_timeout`) and, for
    /// WebSocket, completes the upgrade.
    pub fn connect(
        addr: SocketAddr,
        transport: &Transport,
        message_bytes: usize,
        id: u16,
        io_timeout: Duration,
    ) -> Result<Session, ClientError> {
        if message_bytes == 0 || message_bytes > MAX_MESSAGE_BYTES {
            return Err(ClientError::Protocol(format!(
                "message size {message_bytes} outside 1..={MAX_MESSAGE_BYTES}"
            )));
        }
        let (stream, leftover) = open_stream(addr, transport, io_timeout, u64::from(id))?;
        if leftover.len() > RX_BUF_BYTES {
            return Err(ClientError::Protocol(
                "too many bytes after the upgrade".into(),
            ));
        }
        let mut s = Session {
            stream,
            websocket: false,
            id,
            seq: 0,
            rng: Rng::seeded(u64::from(id)),
            msg: vec![0; message_bytes],
            echo: vec![0; message_bytes],
            tx: vec![0; message_bytes + wsproto::MAX_CLIENT_HEADER],
            rx: vec![0; RX_BUF_BYTES],
            rx_start: 0,
            rx_end: 0,
        };
        s.websocket = matches!(transport, Transport::WebSocket { .. });
        s.rx[..leftover.len()].copy_from_slice(&leftover);
        s.rx_end = leftover.len();
        Ok(s)
    }

    /// Sends one message and waits for its complete echo; returns the time
    /// from just before the send to just after the last echoed byte.
    pub fn round_trip(&mut self) -> Result<Duration, ClientError> {
        self.seq += 1;
        let stamp = self.seq.to_le_bytes();
        let id = self.id.to_le_bytes();
        for (i, b) in self.msg.iter_mut().enumerate() {
            let j = i % 10;
            *b = if j < 8 { stamp[j] } else { id[j - 8] };
        }
        let frame_len = if self.websocket {
            let mask = self.rng.next_mask();
            wsproto::encode_client_frame(wsproto::OP_BINARY, &self.msg, mask, &mut self.tx)?
        } else {
            0
        };

        let start = Instant::now();
        if self.websocket {
            self.stream.write_all(&self.tx[..frame_len])?;
            self.read_ws_echo()?;
        } else {
            self.stream.write_all(&self.msg)?;
            let len = self.msg.len();
            read_exact_or_closed(&mut self.stream, &mut self.echo[..len])?;
        }
        let elapsed = start.elapsed();

        if self.echo != self.msg {
            return Err(ClientError::Mismatch { seq: self.seq });
        }
        Ok(elapsed)
    }

    /// Sends a close frame with `code` (the polite end of a session; the
    /// caller drops the session afterwards).
    pub fn send_close(&mut self, code: u16) -> Result<(), ClientError> {
        if !self.websocket {
            return Ok(());
        }
        let mut close = [0u8; 2 + wsproto::MAX_CLIENT_HEADER];
        let mask = self.rng.next_mask();
        let n =
            wsproto::encode_client_frame(wsproto::OP_CLOSE, &code.to_be_bytes(), mask, &mut close)?;
        self.stream.write_all(&close[..n])?;
        Ok(())
    }

    /// Waits, sending nothing, for the server's close frame and returns its
    /// code (1005 when it carries none). Data frames are skipped and pings
    /// answered; EOF first, or `timeout` passing, is an error. Bounded by
    /// `timeout` (each read also by the socket's own timeout).
    pub fn await_close(&mut self, timeout: Duration) -> Result<u16, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(h) = wsproto::parse_header(&self.rx[self.rx_start..self.rx_end])? {
                let total = h.header_len + h.payload_len as usize;
                if self.rx_end - self.rx_start < total {
                    break;
                }
                let p0 = self.rx_start + h.header_len;
                let p1 = self.rx_start + total;
                if let Some(mask) = h.mask {
                    wsproto::apply_mask(&mut self.rx[p0..p1], mask, 0);
                }
                if h.opcode == wsproto::OP_CLOSE {
                    return Ok(if p1 - p0 >= 2 {
                        u16::from_be_bytes([self.rx[p0], self.rx[p0 + 1]])
                    } else {
                        1005
                    });
                }
                if h.opcode == wsproto::OP_PING {
                    let mut pong = [0u8; 125 + wsproto::MAX_CLIENT_HEADER];
                    let mask = self.rng.next_mask();
                    let n = wsproto::encode_client_frame(
                        wsproto::OP_PONG,
                        &self.rx[p0..p1],
                        mask,
                        &mut pong,
                    )?;
                    self.stream.write_all(&pong[..n])?;
                }
                self.rx_start = p1;
            }
            if self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            if self.rx_end == self.rx.len() {
                return Err(ClientError::Protocol("frame larger than buffer".into()));
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Protocol(format!(
                    "no close frame within {timeout:?}"
                )));
            }
            let n = match self.stream.read(&mut self.rx[self.rx_end..]) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(ClientError::Closed("EOF without a close frame".into()));
            }
            self.rx_end += n;
        }
    }

    /// Reads frames until `msg.len()` payload bytes have arrived, answering
    /// pings on the way.
    fn read_ws_echo(&mut self) -> Result<(), ClientError> {
        let expected = self.msg.len();
        let mut got = 0;
        loop {
            while let Some(h) = wsproto::parse_header(&self.rx[self.rx_start..self.rx_end])? {
                // payload_len <= MAX_RX_PAYLOAD, so this fits the buffer.
                let total = h.header_len + h.payload_len as usize;
                if self.rx_end - self.rx_start < total {
                    break;
                }
                let p0 = self.rx_start + h.header_len;
                let p1 = self.rx_start + total;
                if let Some(mask) = h.mask {
                    wsproto::apply_mask(&mut self.rx[p0..p1], mask, 0);
                }
                match h.opcode {
                    wsproto::OP_BINARY | wsproto::OP_CONTINUATION => {
                        let n = p1 - p0;
                        if got + n > expected {
                            return Err(ClientError::Protocol(format!(
                                "echo longer than the {expected}-byte message"
                            )));
                        }
                        self.echo[got..got + n].copy_from_slice(&self.rx[p0..p1]);
                        got += n;
                    }
                    wsproto::OP_PING => {
                        // Control payloads are <= 125 bytes: a stack buffer is enough.
                        let mut pong = [0u8; 125 + wsproto::MAX_CLIENT_HEADER];
                        let mask = self.rng.next_mask();
                        let n = wsproto::encode_client_frame(
                            wsproto::OP_PONG,
                            &self.rx[p0..p1],
                            mask,
                            &mut pong,
                        )?;
                        self.stream.write_all(&pong[..n])?;
                    }
                    wsproto::OP_PONG => {}
                    wsproto::OP_CLOSE => {
                        let code = if p1 - p0 >= 2 {
                            u16::from_be_bytes([self.rx[p0], self.rx[p0 + 1]])
                        } else {
                            1005
                        };
                        return Err(ClientError::Closed(format!("close frame, code {code}")));
                    }
                    other => {
                        return Err(ClientError::Protocol(format!(
                            "unexpected opcode {other:#x}"
                        )))
                    }
                }
                self.rx_start = p1;
            }
            if got == expected {
                if self.rx_start == self.rx_end {
                    self.rx_start = 0;
                    self.rx_end = 0;
                }
                return Ok(());
            }
            // Need more bytes: keep the partial frame at the front of the buffer.
            if self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            if self.rx_end == self.rx.len() {
                return Err(ClientError::Protocol("frame larger than buffer".into()));
            }
            let n = self.stream.read(&mut self.rx[self.rx_end..])?;
            if n == 0 {
                return Err(ClientError::Closed("EOF while waiting for echo".into()));
            }
            self.rx_end += n;
        }
    }
}

/// Connects (TCP_NODELAY, read/write timeouts of `io_timeout`) and, for
/// WebSocket, completes the upgrade. Returns the stream and any bytes that
/// came after the response headers (already frames).
pub fn open_stream(
    addr: SocketAddr,
    transport: &Transport,
    io_timeout: Duration,
    salt: u64,
) -> Result<(TcpStream, Vec<u8>), ClientError> {
    let mut stream = TcpStream::connect_timeout(&addr, io_timeout).map_err(ClientError::Connect)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    let Transport::WebSocket { path, subprotocol } = transport else {
        return Ok((stream, Vec::new()));
    };
    let mut rng = Rng::seeded(salt);
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    raw[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    let key = wsproto::encode_key(raw);
    let req = wsproto::upgrade_request(&addr.to_string(), path, &key, subprotocol.as_deref());
    stream.write_all(req.as_bytes())?;
    let mut buf = vec![0u8; MAX_UPGRADE_RESPONSE_BYTES];
    let mut len = 0;
    loop {
        if len == MAX_UPGRADE_RESPONSE_BYTES {
            return Err(ClientError::Handshake("response headers too long".into()));
        }
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Err(ClientError::Closed("during the upgrade".into()));
        }
        len += n;
        match wsproto::check_upgrade_response(&buf[..len], &key) {
            Ok(UpgradeResponse::Partial) => continue,
            Ok(UpgradeResponse::Accepted { body_offset }) => {
                return Ok((stream, buf[body_offset..len].to_vec()));
            }
            Err(e) => return Err(ClientError::Handshake(e)),
        }
    }
}

/// Random-enough mask keys for a sender of many frames.
pub fn mask_source(salt: u64) -> impl FnMut() -> [u8; 4] {
    let mut rng = Rng::seeded(salt);
    move || rng.next_mask()
}

fn read_exact_or_closed(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), ClientError> {
    match stream.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(ClientError::Closed("EOF while waiting for echo".into()))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-connection WebSocket echo server that answers each message as a
    /// 3-byte fragment, a ping, then the rest — the awkward case for a client.
    fn awkward_ws_echo(listener: TcpListener, messages: usize) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            wsproto::answer_upgrade(&mut s);
            let mut pongs = 0;
            for _ in 0..messages {
                let mut hdr = [0u8; 6];
                s.read_exact(&mut hdr).unwrap();
                let h = wsproto::parse_header(&hdr).unwrap().unwrap();
                assert_eq!(h.opcode, wsproto::OP_BINARY);
                let mut p = vec![0u8; h.payload_len as usize];
                s.read_exact(&mut p).unwrap();
                wsproto::apply_mask(&mut p, h.mask.unwrap(), 0);
                let mut out = vec![0x02, 3];
                out.extend_from_slice(&p[..3]);
                out.extend_from_slice(&[0x89, 2, b'h', b'i']);
                out.extend_from_slice(&[0x80, (p.len() - 3) as u8]);
                out.extend_from_slice(&p[3..]);
                s.write_all(&out).unwrap();
                // The client answers the ping with a masked pong "hi".
                let mut pong = [0u8; 8];
                s.read_exact(&mut pong).unwrap();
                let h = wsproto::parse_header(&pong).unwrap().unwrap();
                let mut body = [pong[6], pong[7]];
                wsproto::apply_mask(&mut body, h.mask.unwrap(), 0);
                if h.opcode == wsproto::OP_PONG && &body == b"hi" {
                    pongs += 1;
                }
            }
            pongs
        })
    }

    #[test]
    fn websocket_round_trips_survive_fragments_and_pings() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = awkward_ws_echo(listener, 20);
        let transport = Transport::WebSocket {
            path: "/".into(),
            subprotocol: None,
        };
        let mut s = Session::connect(addr, &transport, 10, 7, Duration::from_secs(5)).unwrap();
        for _ in 0..20 {
            s.round_trip().unwrap();
        }
        assert_eq!(server.join().unwrap(), 20);
    }

    #[test]
    fn await_close_returns_the_servers_code_and_send_close_sends_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            wsproto::answer_upgrade(&mut s);
            // Data, a ping, then close 1008 "revoked".
            let mut out = vec![0x82, 2, b'a', b'b', 0x89, 1, b'p'];
            out.extend_from_slice(&[0x88, 9, 0x03, 0xf0]);
            out.extend_from_slice(b"revoked");
            s.write_all(&out).unwrap();
            // The pong, then the client's own close frame 1000.
            let mut pong = [0u8; 7];
            s.read_exact(&mut pong).unwrap();
            let mut close = [0u8; 8];
            s.read_exact(&mut close).unwrap();
            let h = wsproto::parse_header(&close).unwrap().unwrap();
            let mut code = [close[6], close[7]];
            wsproto::apply_mask(&mut code, h.mask.unwrap(), 0);
            (pong[0], h.opcode, u16::from_be_bytes(code))
        });
        let transport = Transport::WebSocket {
            path: "/".into(),
            subprotocol: None,
        };
        let mut s = Session::connect(addr, &transport, 10, 1, Duration::from_secs(5)).unwrap();
        assert_eq!(s.await_close(Duration::from_secs(5)).unwrap(), 1008);
        s.send_close(1000).unwrap();
        assert_eq!(server.join().unwrap(), (0x8a, wsproto::OP_CLOSE, 1000));
        // A server that only closes the connection: an error, not a hang.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            wsproto::answer_upgrade(&mut s);
        });
        let mut s = Session::connect(addr, &transport, 10, 1, Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        assert!(matches!(
            s.await_close(Duration::from_secs(5)),
            Err(ClientError::Closed(_))
        ));
    }

    #[test]
    fn a_corrupting_peer_is_caught() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut b = [0u8; 10];
            s.read_exact(&mut b).unwrap();
            b[9] ^= 1;
            s.write_all(&b).unwrap();
        });
        let mut s = Session::connect(addr, &Transport::Raw, 10, 1, Duration::from_secs(5)).unwrap();
        assert!(matches!(
            s.round_trip(),
            Err(ClientError::Mismatch { seq: 1 })
        ));
        server.join().unwrap();
    }
}
