//! The WebMKS case's direct baseline: a blocking client that speaks TLS +
//! WebSocket straight to the stand-in host's echo ticket (no appliance), so
//! the latency the appliance adds on a `webmks` session can be told from
//! what the host's TLS and framing cost anyway. Same message layout and
//! check as `client::Session` (the echo must be byte for byte what was
//! sent); all buffers allocated in `connect`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::client::MAX_MESSAGE_BYTES;
use crate::wsproto::{self, UpgradeResponse};

/// Longest upgrade response accepted.
const MAX_RESPONSE_BYTES: usize = 16 * 1024;
/// Receive buffer: one maximal server frame plus its header.
const RX_BUF_BYTES: usize = wsproto::MAX_RX_PAYLOAD as usize + 16;

pub struct WssSession {
    tls: StreamOwned<ClientConnection, TcpStream>,
    seq: u64,
    id: u16,
    next_mask: Box<dyn FnMut() -> [u8; 4] + Send>,
    msg: Vec<u8>,
    echo: Vec<u8>,
    tx: Vec<u8>,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
}

/// Whether the 101 in `head` chose `binary` (the host's answer).
fn chose_binary(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    if resp.parse(head).is_err() {
        return false;
    }
    resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("sec-websocket-protocol")
            && h.value.trim_ascii() == crate::wss_backend::SUBPROTOCOL.as_bytes()
    })
}

impl WssSession {
    /// TCP (TCP_NODELAY, timeouts of `io_timeout`), TLS with `tls`, then the
    /// upgrade to `path` offering `binary`.
    pub fn connect(
        addr: SocketAddr,
        path: &str,
        tls: Arc<ClientConfig>,
        message_bytes: usize,
        id: u16,
        io_timeout: Duration,
    ) -> Result<WssSession, String> {
        if message_bytes == 0 || message_bytes > MAX_MESSAGE_BYTES {
            return Err(format!("message size {message_bytes} out of range"));
        }
        let tcp =
            TcpStream::connect_timeout(&addr, io_timeout).map_err(|e| format!("connect: {e}"))?;
        let setup = |t: &TcpStream| -> std::io::Result<()> {
            t.set_nodelay(true)?;
            t.set_read_timeout(Some(io_timeout))?;
            t.set_write_timeout(Some(io_timeout))
        };
        setup(&tcp).map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(tls, crate::wss_backend::server_name())
            .map_err(|e| format!("tls: {e}"))?;
        let mut tls = StreamOwned::new(conn, tcp);
        let mut next_mask = crate::client::mask_source(u64::from(id) << 32 | 0x7715);
        let mut raw = [0u8; 16];
        for part in raw.chunks_mut(4) {
            part.copy_from_slice(&next_mask());
        }
        let key = wsproto::encode_key(raw);
        let req = wsproto::upgrade_request(&addr.to_string(), path, &key, Some("binary"));
        tls.write_all(req.as_bytes())
            .and_then(|()| tls.flush())
            .map_err(|e| format!("upgrade request: {e}"))?;
        let mut rx = vec![0u8; RX_BUF_BYTES];
        let mut len = 0;
        let body = loop {
            if len >= MAX_RESPONSE_BYTES {
                return Err("upgrade response too long".into());
            }
            let n = tls
                .read(&mut rx[len..MAX_RESPONSE_BYTES])
                .map_err(|e| format!("upgrade response: {e}"))?;
            if n == 0 {
                return Err("closed during the upgrade".into());
            }
            len += n;
            match wsproto::check_upgrade_response(&rx[..len], &key)? {
                UpgradeResponse::Partial => {}
                UpgradeResponse::Accepted { body_offset } => break body_offset,
            }
        };
        if !chose_binary(&rx[..body]) {
            return Err("the host did not choose subprotocol binary".into());
        }
        rx.copy_within(body..len, 0);
        Ok(WssSession {
            tls,
            seq: 0,
            id,
            next_mask: Box::new(next_mask),
            msg: vec![0; message_bytes],
            echo: vec![0; message_bytes],
            tx: vec![0; message_bytes + wsproto::MAX_CLIENT_HEADER],
            rx,
            rx_start: 0,
            rx_end: len - body,
        })
    }

    /// Sends one masked binary message and waits for all of its echo; the
    /// time from just before the write to just after the last echoed byte.
    pub fn round_trip(&mut self) -> Result<Duration, String> {
        self.seq += 1;
        let stamp = self.seq.to_le_bytes();
        let id = self.id.to_le_bytes();
        for (i, b) in self.msg.iter_mut().enumerate() {
            let j = i % 10;
            *b = if j < 8 { stamp[j] } else { id[j - 8] };
        }
        let mask = (self.next_mask)();
        let n = wsproto::encode_client_frame(wsproto::OP_BINARY, &self.msg, mask, &mut self.tx)
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        self.tls
            .write_all(&self.tx[..n])
            .and_then(|()| self.tls.flush())
            .map_err(|e| format!("write: {e}"))?;
        self.read_echo()?;
        let elapsed = start.elapsed();
        if self.echo != self.msg {
            return Err(format!("echo of message {} differs", self.seq));
        }
        Ok(elapsed)
    }

    fn read_echo(&mut self) -> Result<(), String> {
        let expected = self.msg.len();
        let mut got = 0;
        loop {
            while let Some(h) = wsproto::parse_header(&self.rx[self.rx_start..self.rx_end])
                .map_err(|e| e.to_string())?
            {
                let total = h.header_len + h.payload_len as usize;
                if self.rx_end - self.rx_start < total {
                    break;
                }
                let (p0, p1) = (self.rx_start + h.header_len, self.rx_start + total);
                match h.opcode {
                    wsproto::OP_BINARY | wsproto::OP_CONTINUATION if h.mask.is_none() => {
                        let n = p1 - p0;
                        if got + n > expected {
                            return Err("echo longer than the message".into());
                        }
                        self.echo[got..got + n].copy_from_slice(&self.rx[p0..p1]);
                        got += n;
                    }
                    op => return Err(format!("unexpected frame (opcode {op:#x}) from the host")),
                }
                self.rx_start = p1;
            }
            if got == expected {
                if self.rx_start == self.rx_end {
                    (self.rx_start, self.rx_end) = (0, 0);
                }
                return Ok(());
            }
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
            if self.rx_end == self.rx.len() {
                return Err("frame larger than the buffer".into());
            }
            let n = self
                .tls
                .read(&mut self.rx[self.rx_end..])
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("EOF while waiting for the echo".into());
            }
            self.rx_end += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wss_backend::{Identity, Mode, WssBackend};

    #[test]
    fn round_trips_through_the_stand_in_host() {
        let id = Identity::generate().unwrap();
        let mut host = WssBackend::start(&id, 1024, 1 << 20).unwrap();
        let tls = id.client_config().unwrap();
        let mut s = WssSession::connect(
            host.addr(),
            Mode::Echo.path(),
            tls.clone(),
            10,
            1,
            Duration::from_secs(5),
        )
        .unwrap();
        for _ in 0..20 {
            assert!(s.round_trip().unwrap() > Duration::ZERO);
        }
        assert!(host.cipher_suite().is_some_and(|c| c.starts_with("TLS")));
        // A ticket the host does not know is refused, not upgraded.
        let refused = WssSession::connect(
            host.addr(),
            "/ticket/unknown",
            tls,
            10,
            2,
            Duration::from_secs(5),
        );
        assert!(refused.err().unwrap().contains("404"));
        host.stop();
    }
}
