//! What TLS alone costs per byte, the term the WebMKS relay's CPU target
//! allows on top of the VNC relay's: rustls in memory, no sockets, no
//! WebSocket, measured by the CPU clock of the one thread doing it.
//!
//! Same provider (ring), same default configurations and therefore the
//! same cipher suite as the appliance's backend leg to the stand-in host,
//! TLS records of the same size (the sender writes 64 KiB plaintext chunks,
//! which rustls cuts into 16 KiB records):
//!
//! - **decrypt** (the appliance's backend → browser work): a rustls
//!   *client* connection's `read_tls` of records already in memory,
//!   `process_new_packets`, and `reader().read` of the plaintext into a
//!   64 KiB buffer (the appliance reads it into a buffer of that size too);
//!   the server that sealed the records is not timed.
//! - **encrypt** (the appliance's browser → backend work): a rustls client
//!   connection's `writer().write` of 64 KiB chunks and `write_tls` of the
//!   records into a reused in-memory buffer.
//!
//! Work is timed in batches of [`BATCH_BYTES`] (kept small enough to stay in
//! cache, as freshly received bytes are), so the clock is read twice per
//! batch. CPU seconds per 10^9 plaintext bytes.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls::{ClientConnection, ServerConnection};
use serde::Serialize;

use crate::wss_backend::{self, Identity};

/// Plaintext per write (as the stream backend's frames) and per read.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Plaintext sealed, then timed, per batch.
pub const BATCH_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct TlsCost {
    /// The suite both sides negotiated (e.g. `TLS13_AES_256_GCM_SHA384`).
    pub cipher_suite: String,
    pub bytes: u64,
    pub decrypt_cpu_s: f64,
    pub encrypt_cpu_s: f64,
    pub decrypt_cpu_s_per_gb: f64,
    pub encrypt_cpu_s_per_gb: f64,
}

/// This thread's CPU time (user + system).
pub fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Moves records between the two sides until neither has any to send
/// (the handshake).
fn pump(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<()> {
    let mut wire = Vec::new();
    // Bounded: a TLS 1.3 handshake is a few flights.
    for _ in 0..16 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire)?;
        }
        if !wire.is_empty() {
            server.read_tls(&mut wire.as_slice())?;
            server.process_new_packets()?;
        }
        wire.clear();
        while server.wants_write() {
            server.write_tls(&mut wire)?;
        }
        if !wire.is_empty() {
            client.read_tls(&mut wire.as_slice())?;
            client.process_new_packets()?;
        }
    }
    bail!("TLS handshake did not finish")
}

/// A connected client/server pair with the bench's stand-in identity.
fn connected(identity: &Identity) -> Result<(ClientConnection, ServerConnection)> {
    let mut client = ClientConnection::new(identity.client_config()?, wss_backend::server_name())?;
    let mut server = ServerConnection::new(identity.server_config()?)?;
    pump(&mut client, &mut server).context("in-memory TLS handshake")?;
    Ok((client, server))
}

/// Encrypts all of `data` on `conn`, appending the records to `wire`
/// (rustls takes plaintext only up to its buffer limit: write, drain,
/// repeat, as the appliance's backend leg does).
fn seal<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    mut data: &[u8],
    wire: &mut Vec<u8>,
) -> Result<()> {
    while !data.is_empty() {
        let taken = conn.writer().write(data)?;
        data = &data[taken..];
        while conn.wants_write() {
            conn.write_tls(wire)?;
        }
        if taken == 0 {
            bail!("rustls took no plaintext with its output drained");
        }
    }
    Ok(())
}

/// Decrypts `wire` (whole records) on `client`; plaintext bytes read.
fn decrypt_batch(client: &mut ClientConnection, wire: &[u8], out: &mut [u8]) -> Result<u64> {
    let mut rest = wire;
    let mut got = 0u64;
    while !rest.is_empty() {
        client.read_tls(&mut rest)?;
        client.process_new_packets()?;
        loop {
            match client.reader().read(out) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(got)
}

/// CPU seconds of decrypting `bytes` of plaintext (rounded up to batches).
fn decrypt(identity: &Identity, bytes: u64, time_limit: Duration) -> Result<(f64, u64)> {
    let (mut client, mut server) = connected(identity)?;
    let plain = vec![0x5Au8; CHUNK_BYTES];
    let mut wire = Vec::with_capacity(BATCH_BYTES + BATCH_BYTES / 64);
    let mut out = vec![0u8; CHUNK_BYTES];
    let (mut cpu, mut done) = (Duration::ZERO, 0u64);
    let deadline = Instant::now() + time_limit;
    while done < bytes && Instant::now() < deadline {
        wire.clear();
        for _ in 0..BATCH_BYTES / CHUNK_BYTES {
            seal(&mut server, &plain, &mut wire)?;
        }
        let t0 = thread_cpu();
        let got = decrypt_batch(&mut client, &wire, &mut out)?;
        cpu += thread_cpu().saturating_sub(t0);
        if got != BATCH_BYTES as u64 {
            bail!("decrypted {got} bytes of a {BATCH_BYTES}-byte batch");
        }
        done += got;
    }
    Ok((cpu.as_secs_f64(), done))
}

/// CPU seconds of encrypting `bytes` of plaintext (rounded up to batches).
fn encrypt(identity: &Identity, bytes: u64, time_limit: Duration) -> Result<(f64, u64)> {
    let (mut client, _server) = connected(identity)?;
    let plain = vec![0xA5u8; CHUNK_BYTES];
    let mut wire = Vec::with_capacity(BATCH_BYTES + BATCH_BYTES / 64);
    let (mut cpu, mut done) = (Duration::ZERO, 0u64);
    let deadline = Instant::now() + time_limit;
    while done < bytes && Instant::now() < deadline {
        wire.clear();
        let t0 = thread_cpu();
        for _ in 0..BATCH_BYTES / CHUNK_BYTES {
            seal(&mut client, &plain, &mut wire)?;
        }
        cpu += thread_cpu().saturating_sub(t0);
        // Records carry a little more than their plaintext.
        if wire.len() <= BATCH_BYTES {
            bail!(
                "{} record bytes for {BATCH_BYTES} plaintext bytes",
                wire.len()
            );
        }
        done += BATCH_BYTES as u64;
    }
    Ok((cpu.as_secs_f64(), done))
}

/// Both costs for about `bytes` of plaintext each, each bounded by
/// `time_limit`.
pub fn measure(identity: &Identity, bytes: u64, time_limit: Duration) -> Result<TlsCost> {
    let (client, _server) = connected(identity)?;
    let cipher_suite = client
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .context("no cipher suite negotiated")?;
    let (decrypt_cpu_s, decrypted) = decrypt(identity, bytes, time_limit)?;
    let (encrypt_cpu_s, encrypted) = encrypt(identity, bytes, time_limit)?;
    let per_gb = |cpu: f64, n: u64| {
        if n == 0 {
            f64::NAN
        } else {
            cpu / (n as f64 / 1e9)
        }
    };
    Ok(TlsCost {
        cipher_suite,
        bytes: decrypted.min(encrypted),
        decrypt_cpu_s,
        encrypt_cpu_s,
        decrypt_cpu_s_per_gb: per_gb(decrypt_cpu_s, decrypted),
        encrypt_cpu_s_per_gb: per_gb(encrypt_cpu_s, encrypted),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_costs_are_measured_on_the_negotiated_suite() {
        let id = Identity::generate().unwrap();
        let c = measure(&id, 8 << 20, Duration::from_secs(20)).unwrap();
        assert_eq!(c.bytes, 8 << 20);
        assert!(c.cipher_suite.starts_with("TLS13_"), "{}", c.cipher_suite);
        // AES-GCM costs something, and far less than 100 s per GB.
        for v in [c.decrypt_cpu_s_per_gb, c.encrypt_cpu_s_per_gb] {
            assert!(v > 0.0 && v < 100.0, "{c:?}");
        }
    }

    #[test]
    fn decryption_returns_exactly_what_was_sealed() {
        let id = Identity::generate().unwrap();
        let (mut client, mut server) = connected(&id).unwrap();
        let mut wire = Vec::new();
        seal(&mut server, b"hello, host", &mut wire).unwrap();
        let mut out = vec![0u8; 64];
        assert_eq!(decrypt_batch(&mut client, &wire, &mut out).unwrap(), 11);
        assert_eq!(&out[..11], b"hello, host");
        assert!(thread_cpu() > Duration::ZERO);
    }
}
