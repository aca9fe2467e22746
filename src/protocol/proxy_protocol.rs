//! The PROXY protocol (HAProxy's, versions 1 and 2) as a sans-IO parser:
//! the header a load balancer sends before the client's bytes to say who
//! the client is. Bytes in; the carried addresses and how many bytes the
//! header took out.
//!
//! Bounded: a v1 header is at most [`V1_MAX_BYTES`] (107, the spec's own
//! limit, CRLF included); a v2 header at most [`V2_MAX_BYTES`] (its 16-byte
//! fixed part plus the addresses and TLVs it announces). TLVs are skipped.
//! Whether the sender may send a header at all (a trusted load balancer)
//! is the caller's decision: this module never sees a socket, a clock or a
//! config, and nothing it is fed makes it panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v1 signature ("PROXY" and a space).
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// The v2 signature (12 bytes, chosen to be invalid HTTP and SMTP).
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Longest v1 header, CRLF included (the spec's bound: "PROXY TCP6" and two
/// full IPv6 addresses and ports).
pub const V1_MAX_BYTES: usize = 107;
/// Fixed part of a v2 header: signature, version/command, family, length.
pub const V2_FIXED_BYTES: usize = 16;
/// Longest v2 header accepted: the fixed part plus 1 KiB of addresses and
/// TLVs (a UNIX address pair is 216 bytes; load balancers' TLVs — a VPC
/// endpoint id, an SSL summary, a unique id — fit easily). Longer is
/// refused, so a peer cannot make us buffer 64 KiB before the first
/// request byte.
pub const V2_MAX_BYTES: usize = V2_FIXED_BYTES + 1024;
/// Longest header of either version: what a caller buffers at most.
pub const MAX_HEADER_BYTES: usize = V2_MAX_BYTES;

/// Which version a header was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: Version,
    /// The client (source) address the load balancer saw. None for v1
    /// `UNKNOWN`, v2 `LOCAL` (the balancer's own health check) and v2
    /// families without an IP address (UNSPEC, UNIX): the connection's own
    /// peer address stands then.
    pub source: Option<SocketAddr>,
    /// The address the client connected to (the balancer's front).
    pub destination: Option<SocketAddr>,
}

/// What the first bytes of a connection look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect {
    /// Too few bytes to tell (a prefix of a signature so far).
    NeedMore,
    /// A PROXY header starts here (the whole signature is present).
    Header(Version),
    /// Not a PROXY header.
    NotProxy,
}

/// Why a header was refused (the sender's fault: the load balancer, or a
/// client pretending to be one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol header (neither the v1 nor the v2 signature)")]
    Missing,
    #[error("PROXY v1 header longer than {V1_MAX_BYTES} bytes without its CRLF")]
    V1TooLong,
    #[error("malformed PROXY v1 header: {0}")]
    V1Malformed(&'static str),
    #[error("PROXY v2 version nibble {0:#x} (only 2 is defined)")]
    V2Version(u8),
    #[error("PROXY v2 command {0:#x} (only LOCAL and PROXY are defined)")]
    V2Command(u8),
    #[error("PROXY v2 header of {0} bytes, over the {V2_MAX_BYTES}-byte limit")]
    V2TooLong(usize),
    #[error("PROXY v2 address block of {got} bytes, family needs {need}")]
    V2AddressShort { got: usize, need: usize },
    #[error("PROXY v2 address family {0:#x} unknown")]
    V2Family(u8),
}

impl ProxyError {
    /// A stable snake_case name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Missing => "proxy_header_missing",
            _ => "proxy_header_invalid",
        }
    }
}

/// Whether `buf` starts with a PROXY header signature (v1 or v2), may
/// still become one, or cannot.
pub fn detect(buf: &[u8]) -> Detect {
    for (signature, version) in [(V1_PREFIX, Version::V1), (&V2_SIGNATURE[..], Version::V2)] {
        let n = buf.len().min(signature.len());
        if buf[..n] == signature[..n] {
            return if n == signature.len() {
                Detect::Header(version)
            } else {
                Detect::NeedMore
            };
        }
    }
    Detect::NotProxy
}

/// Parse a header at the start of `buf`: `Ok(None)` while it is
/// incomplete, `Ok(Some((header, consumed)))` once whole (the bytes after
/// `consumed` are the client's), an error when it is not a valid header.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    match detect(buf) {
        Detect::NeedMore => Ok(None),
        Detect::NotProxy => Err(ProxyError::Missing),
        Detect::Header(Version::V1) => parse_v1(buf),
        Detect::Header(Version::V2) => parse_v2(buf),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX_BYTES)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX_BYTES {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(None)
        };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(ProxyError::V1Malformed("a bare LF ends the line"));
    }
    let line = std::str::from_utf8(&window[V1_PREFIX.len()..lf - 1])
        .map_err(|_| ProxyError::V1Malformed("not ASCII"))?;
    let consumed = lf + 1;
    let mut fields = line.split(' ');
    let protocol = fields.next().unwrap_or_default();
    if protocol == "UNKNOWN" {
        // The spec: the rest of the line is to be ignored.
        let header = ProxyHeader {
            version: Version::V1,
            source: None,
            destination: None,
        };
        return Ok(Some((header, consumed)));
    }
    let v6 = match protocol {
        "TCP4" => false,
        "TCP6" => true,
        _ => {
            return Err(ProxyError::V1Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::V1Malformed(
            "expected four fields after the protocol, single spaces",
        ));
    };
    let source = SocketAddr::new(v1_ip(src, v6)?, v1_port(sport)?);
    let destination = SocketAddr::new(v1_ip(dst, v6)?, v1_port(dport)?);
    let header = ProxyHeader {
        version: Version::V1,
        source: Some(source),
        destination: Some(destination),
    };
    Ok(Some((header, consumed)))
}

fn v1_ip(s: &str, v6: bool) -> Result<IpAddr, ProxyError> {
    if v6 {
        s.parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| ProxyError::V1Malformed("not an IPv6 address"))
    } else {
        s.parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| ProxyError::V1Malformed("not an IPv4 address"))
    }
}

fn v1_port(s: &str) -> Result<u16, ProxyError> {
    // The spec: decimal, no leading zero (so "0" alone is allowed).
    let canonical = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    if !canonical {
        return Err(ProxyError::V1Malformed("port is not a decimal 0..65535"));
    }
    s.parse::<u16>()
        .map_err(|_| ProxyError::V1Malformed("port is not a decimal 0..65535"))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.len() < V2_FIXED_BYTES {
        return Ok(None);
    }
    let version = buf[12] >> 4;
    let command = buf[12] & 0x0F;
    if version != 2 {
        return Err(ProxyError::V2Version(version));
    }
    let declared = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = V2_FIXED_BYTES + declared;
    if total > V2_MAX_BYTES {
        return Err(ProxyError::V2TooLong(total));
    }
    let local = match command {
        0 => true,
        1 => false,
        other => return Err(ProxyError::V2Command(other)),
    };
    if buf.len() < total {
        return Ok(None);
    }
    let block = &buf[V2_FIXED_BYTES..total];
    let (source, destination) = v2_addresses(buf[13] >> 4, block)?;
    let header = if local {
        // LOCAL: the balancer speaks for itself (a health check); any
        // address block is to be ignored.
        ProxyHeader {
            version: Version::V2,
            source: None,
            destination: None,
        }
    } else {
        ProxyHeader {
            version: Version::V2,
            source,
            destination,
        }
    };
    Ok(Some((header, total)))
}

type AddressPair = (Option<SocketAddr>, Option<SocketAddr>);

/// The address block of a v2 header by family (high nibble of byte 13):
/// 0 UNSPEC, 1 INET (12 bytes), 2 INET6 (36 bytes), 3 UNIX (216 bytes).
/// The transport nibble is not checked: a stream is a stream to us.
fn v2_addresses(family: u8, block: &[u8]) -> Result<AddressPair, ProxyError> {
    let need = match family {
        0 => return Ok((None, None)),
        1 => 12,
        2 => 36,
        3 => 216,
        other => return Err(ProxyError::V2Family(other)),
    };
    if block.len() < need {
        return Err(ProxyError::V2AddressShort {
            got: block.len(),
            need,
        });
    }
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    match family {
        1 => {
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    block[at],
                    block[at + 1],
                    block[at + 2],
                    block[at + 3],
                ))
            };
            Ok((
                Some(SocketAddr::new(ip(0), port(8))),
                Some(SocketAddr::new(ip(4), port(10))),
            ))
        }
        2 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&block[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Ok((
                Some(SocketAddr::new(ip(0), port(32))),
                Some(SocketAddr::new(ip(16), port(34))),
            ))
        }
        // UNIX sockets carry paths, no IP: the peer address stands.
        _ => Ok((None, None)),
    }
}

/// A v1 header for `source` → `destination` (both of one family), for
/// tests and tools that play the load balancer.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let protocol = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {protocol} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// A v2 PROXY-command header for `source` → `destination` (both of one
/// family) followed by `tlvs` (raw, already encoded), for tests and tools.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21); // version 2, command PROXY
    let mut block = Vec::with_capacity(36 + tlvs.len());
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // INET, STREAM
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21); // INET6, STREAM
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            block.extend_from_slice(&v6(s).octets());
            block.extend_from_slice(&v6(d).octets());
        }
    }
    block.extend_from_slice(&source.port().to_be_bytes());
    block.extend_from_slice(&destination.port().to_be_bytes());
    block.extend_from_slice(tlvs);
    let len = u16::try_from(block.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&block);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let mut buf = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\nGET / HTTP/1.1".to_vec();
        let (h, n) = parse(&buf).unwrap().unwrap();
        assert_eq!(h.version, Version::V1);
        assert_eq!(h.source, Some(addr("192.0.2.7:51234")));
        assert_eq!(h.destination, Some(addr("198.51.100.1:443")));
        assert_eq!(&buf[n..], b"GET / HTTP/1.1");
        buf = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n".to_vec();
        let (h, n) = parse(&buf).unwrap().unwrap();
        assert_eq!(h.source, Some(addr("[2001:db8::1]:1")));
        assert_eq!(n, buf.len());
        let (h, n) = parse(b"PROXY UNKNOWN whatever follows\r\nx")
            .unwrap()
            .unwrap();
        assert_eq!((h.source, n), (None, 32));
        let (h, _) = parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap();
        assert_eq!(h.source, None);
    }

    #[test]
    fn v1_incomplete_then_complete_at_every_split() {
        let whole = encode_v1(addr("10.1.2.3:4000"), addr("10.0.0.1:80"));
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut]), Ok(None), "cut {cut}");
        }
        let (h, n) = parse(&whole).unwrap().unwrap();
        assert_eq!((h.source, n), (Some(addr("10.1.2.3:4000")), whole.len()));
    }

    #[test]
    fn v1_refusals() {
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 \xff 2\r\n",
        ];
        for b in bad {
            assert!(
                matches!(parse(b), Err(ProxyError::V1Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 200]].concat();
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
        // 106 bytes without CRLF yet: still waiting; 107 without: refused.
        assert_eq!(parse(&long[..V1_MAX_BYTES - 1]), Ok(None));
        assert_eq!(parse(&long[..V1_MAX_BYTES]), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v2_inet_inet6_local_and_tlvs() {
        let h4 = encode_v2(addr("203.0.113.9:40000"), addr("10.0.0.1:443"), &[]);
        assert_eq!(h4.len(), 28);
        let mut buf = h4.clone();
        buf.extend_from_slice(b"GET");
        let (h, n) = parse(&buf).unwrap().unwrap();
        assert_eq!(h.version, Version::V2);
        assert_eq!(h.source, Some(addr("203.0.113.9:40000")));
        assert_eq!(h.destination, Some(addr("10.0.0.1:443")));
        assert_eq!(&buf[n..], b"GET");
        let tlv = [0x04, 0x00, 0x03, b'a', b'b', b'c'];
        let h6 = encode_v2(addr("[2001:db8::9]:5"), addr("[2001:db8::1]:6"), &tlv);
        let (h, n) = parse(&h6).unwrap().unwrap();
        assert_eq!((h.source, n), (Some(addr("[2001:db8::9]:5")), h6.len()));
        for cut in 0..h6.len() {
            assert_eq!(parse(&h6[..cut]), Ok(None), "cut {cut}");
        }
        // LOCAL (health check): no client address, block ignored.
        let mut local = h4.clone();
        local[12] = 0x20;
        let (h, _) = parse(&local).unwrap().unwrap();
        assert_eq!(h.source, None);
        // UNSPEC family with an empty block.
        let mut unspec = V2_SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&unspec).unwrap().unwrap().0.source, None);
    }

    #[test]
    fn v2_refusals_and_the_length_limit() {
        let good = encode_v2(addr("1.2.3.4:1"), addr("5.6.7.8:2"), &[]);
        let with = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            b
        };
        assert_eq!(parse(&with(12, 0x11)), Err(ProxyError::V2Version(1)));
        assert_eq!(parse(&with(12, 0x2F)), Err(ProxyError::V2Command(0xF)));
        assert_eq!(parse(&with(13, 0x41)), Err(ProxyError::V2Family(4)));
        // INET6 family with an INET-sized block.
        assert_eq!(
            parse(&with(13, 0x21)),
            Err(ProxyError::V2AddressShort { got: 12, need: 36 })
        );
        // Declared length over the limit: refused before the bytes come.
        let mut huge = good[..14].to_vec();
        huge.extend_from_slice(&0xFFFFu16.to_be_bytes());
        assert_eq!(
            parse(&huge),
            Err(ProxyError::V2TooLong(V2_FIXED_BYTES + 0xFFFF))
        );
        let at_limit = encode_v2(
            addr("1.2.3.4:1"),
            addr("5.6.7.8:2"),
            &vec![0u8; V2_MAX_BYTES - 28],
        );
        assert_eq!(parse(&at_limit).unwrap().unwrap().1, V2_MAX_BYTES);
        let over = encode_v2(
            addr("1.2.3.4:1"),
            addr("5.6.7.8:2"),
            &vec![0u8; V2_MAX_BYTES - 27],
        );
        assert!(matches!(parse(&over), Err(ProxyError::V2TooLong(_))));
    }

    #[test]
    fn detect_and_not_proxy() {
        assert_eq!(detect(b""), Detect::NeedMore);
        assert_eq!(detect(b"PRO"), Detect::NeedMore);
        assert_eq!(detect(b"PROXY "), Detect::Header(Version::V1));
        assert_eq!(detect(&V2_SIGNATURE[..5]), Detect::NeedMore);
        assert_eq!(detect(&V2_SIGNATURE), Detect::Header(Version::V2));
        assert_eq!(detect(b"GET / HTTP/1.1"), Detect::NotProxy);
        assert_eq!(detect(b"POST"), Detect::NotProxy);
        assert_eq!(detect(&[0x16, 0x03]), Detect::NotProxy);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Missing));
        assert_eq!(ProxyError::Missing.kind(), "proxy_header_missing");
    }
}
