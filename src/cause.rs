//! Why a connection was refused or a session ended: one [`Cause`] for the
//! whole data plane, with the stable name metrics and logs use (`kind`), the
//! side that caused it (`side`), the HTTP status a refusal answers with
//! (`status`) and the WebSocket close code an ended session sends
//! (`close_code`).
//!
//! Every cause has a fixed index, so a worker counts them in a plain array
//! ([`CauseCounts`]) instead of searching a list of strings. The protocol
//! modules keep their own error enums (they say what was wrong in detail);
//! the `From` impls here say what each one means for a session.
//!
//! Depends on the protocol error types only (the router maps its own
//! errors, in `dataplane::router`); on nothing that does IO.

use crate::protocol::http_upgrade::HttpError;
use crate::protocol::rfb::{self, RfbError};
use crate::protocol::websocket::{close_code, WsError};

/// Which side of a connection a cause lies with (pingora's
/// downstream/upstream/internal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The browser (or whoever connected to the console port).
    Browser,
    /// The VNC server or WebMKS endpoint.
    Backend,
    /// The appliance itself: a limit, a resource, the operator's config.
    Appliance,
    /// Nobody did anything wrong (a normal close, a shutdown).
    Nobody,
}

macro_rules! causes {
    ($( $(#[$doc:meta])* $name:ident => ($kind:literal, $side:ident, $error:literal, $status:expr, $close:expr), )*) => {
        /// Why a connection was refused or a session ended.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Cause {
            $( $(#[$doc])* $name, )*
        }

        impl Cause {
            /// Every cause, in index order.
            pub const ALL: &'static [Cause] = &[ $( Cause::$name, )* ];
            /// How many causes there are (the size of a counter array).
            pub const COUNT: usize = Self::ALL.len();

            /// Stable snake_case name, for metric labels, logs and JSON codes.
            pub fn kind(self) -> &'static str {
                match self { $( Cause::$name => $kind, )* }
            }

            pub fn side(self) -> Side {
                match self { $( Cause::$name => Side::$side, )* }
            }

            /// An error (counted in `consolegate_errors_total`), as opposed
            /// to a normal end (a close, a shutdown).
            pub fn is_error(self) -> bool {
                match self { $( Cause::$name => $error, )* }
            }

            /// The HTTP status a refusal before the upgrade answers with.
            pub fn status(self) -> Option<u16> {
                match self { $( Cause::$name => $status, )* }
            }

            /// The WebSocket close code a session ended for this sends.
            pub fn close_code(self) -> Option<u16> {
                match self { $( Cause::$name => $close, )* }
            }
        }
    };
}

const CLOSE_PROTOCOL: Option<u16> = Some(close_code::PROTOCOL_ERROR);

causes! {
    // ---- the HTTP upgrade (refused before any WebSocket) -------------------
    Malformed => ("malformed", Browser, true, Some(400), None),
    RequestTooLarge => ("too_large", Browser, true, Some(431), None),
    MethodNotAllowed => ("method_not_allowed", Browser, true, Some(405), None),
    NotHttp11 => ("not_http11", Browser, true, Some(505), None),
    BadUpgrade => ("bad_upgrade", Browser, true, Some(400), None),
    /// `Sec-WebSocket-Version` other than 13.
    UnsupportedWsVersion => ("unsupported_version", Browser, true, Some(426), None),
    BadKey => ("bad_key", Browser, true, Some(400), None),
    MissingHost => ("missing_host", Browser, true, Some(400), None),
    BodyNotAllowed => ("body_not_allowed", Browser, true, Some(400), None),
    NoSupportedSubprotocol => ("no_supported_subprotocol", Browser, true, Some(400), None),
    /// A plain HTTP request on a port that serves no files.
    NotWebsocket => ("not_websocket", Browser, true, Some(400), None),
    OriginNotAllowed => ("origin_not_allowed", Browser, true, Some(403), None),
    HandshakeTimeout => ("handshake_timeout", Browser, true, Some(408), None),
    /// A plain connection on a TLS-only console port (closed, no answer).
    PlainOnTlsOnly => ("plain_on_ssl_only", Browser, true, None, None),
    /// The browser's TLS records were not readable.
    TlsRead => ("tls_read", Browser, true, None, None),
    /// The browser's TLS failed (bad handshake, bad record).
    TlsError => ("tls_error", Browser, true, None, None),
    TlsSetup => ("tls_setup", Appliance, true, None, None),
    /// rustls would take no more plaintext for the browser.
    TlsWrite => ("tls_write", Appliance, true, None, None),

    // ---- routing: tokens and tickets ---------------------------------------
    MissingToken => ("missing_token", Browser, true, Some(400), None),
    UnknownToken => ("unknown_token", Browser, true, Some(404), None),
    TargetUnresolvable => ("target_unresolvable", Appliance, true, Some(502), None),
    BadPath => ("bad_path", Browser, true, Some(400), None),
    UnknownSession => ("unknown_session", Browser, true, Some(404), None),
    BadTicket => ("bad_ticket", Browser, true, Some(403), None),
    TicketReplay => ("ticket_replay", Browser, true, Some(403), None),
    TicketExpired => ("ticket_expired", Browser, true, Some(410), None),
    SessionRevokedBeforeConnect => ("session_revoked", Browser, true, Some(403), None),
    OriginMismatch => ("origin_mismatch", Browser, true, Some(403), None),
    ClientIpMismatch => ("client_ip_mismatch", Browser, true, Some(403), None),

    // ---- a console by VM id (`/ws/console/{vm}`) ----------------------------
    // The control plane's refusals, by the status the REST call gives (the
    // JSON body carries its code); then the worker's own.
    /// No token, or a token that is not valid (401).
    ConsoleUnauthorized => ("console_unauthorized", Browser, true, Some(401), None),
    /// The token's role or `vms` claim does not allow the VM (403).
    ConsoleForbidden => ("console_forbidden", Browser, true, Some(403), None),
    ConsoleVmNotFound => ("console_vm_not_found", Browser, true, Some(404), None),
    /// The VM is not powered on, or its id is ambiguous (409).
    ConsoleConflict => ("console_conflict", Browser, true, Some(409), None),
    /// The viewer pool or the user's rate limit is full (429).
    ConsoleLimited => ("console_limited", Browser, true, Some(429), None),
    /// The hypervisor's queue is full, it is down, the data plane is busy
    /// or the appliance drains (503).
    ConsoleUnavailable => ("console_unavailable", Appliance, true, Some(503), None),
    /// The hypervisor was slower than its queue's timeout (504).
    ConsoleHypervisorTimeout => ("console_hypervisor_timeout", Appliance, true, Some(504), None),
    /// Any other refusal of the control plane (400, 500, 502).
    ConsoleRefused => ("console_refused", Appliance, true, Some(502), None),
    /// No answer within `connect_timeout_ms`: the worker answers 504.
    ConsoleTimeout => ("console_timeout", Appliance, true, Some(504), None),
    /// The worker already holds `max_parked_console_requests_per_worker`.
    ConsoleParkedOverLimit => ("console_parked_over_limit", Appliance, true, Some(503), None),
    /// The report queue to the control plane refused the request.
    ConsoleMailboxFull => ("console_mailbox_full", Appliance, true, Some(503), None),
    /// The path's VM id is empty, too long or not UTF-8.
    ConsoleBadVm => ("console_bad_vm", Browser, true, Some(400), None),
    /// A console by URL on a port without a control plane (proxy mode).
    ConsoleNotServed => ("console_not_served", Browser, true, Some(404), None),
    /// An admission came back for a connection that had gone or timed out:
    /// it was closed unused.
    ConsoleAbandoned => ("console_abandoned", Browser, true, None, None),

    // ---- WebSocket frames from the browser ----------------------------------
    UnmaskedFrame => ("unmasked_frame", Browser, true, None, CLOSE_PROTOCOL),
    ReservedBits => ("reserved_bits", Browser, true, None, CLOSE_PROTOCOL),
    ReservedOpcode => ("reserved_opcode", Browser, true, None, CLOSE_PROTOCOL),
    FragmentedControl => ("fragmented_control", Browser, true, None, CLOSE_PROTOCOL),
    ControlTooLong => ("control_too_long", Browser, true, None, CLOSE_PROTOCOL),
    UnexpectedContinuation => ("unexpected_continuation", Browser, true, None, CLOSE_PROTOCOL),
    ExpectedContinuation => ("expected_continuation", Browser, true, None, CLOSE_PROTOCOL),
    LengthMsbSet => ("length_msb_set", Browser, true, None, CLOSE_PROTOCOL),
    FrameTooBig => ("frame_too_big", Browser, true, None, Some(close_code::TOO_BIG)),
    InvalidUtf8 => ("invalid_utf8", Browser, true, None, Some(close_code::INVALID_PAYLOAD)),
    InvalidBase64 => ("invalid_base64", Browser, true, None, Some(close_code::INVALID_PAYLOAD)),
    Base64Truncated => ("base64_truncated", Browser, true, None, Some(close_code::INVALID_PAYLOAD)),
    BinaryInBase64Mode => ("binary_in_base64_mode", Browser, true, None, Some(close_code::UNSUPPORTED_DATA)),
    BadClosePayload => ("bad_close_payload", Browser, true, None, CLOSE_PROTOCOL),
    InvalidCloseCode => ("invalid_close_code", Browser, true, None, CLOSE_PROTOCOL),
    InvalidCloseReason => ("invalid_close_reason", Browser, true, None, Some(close_code::INVALID_PAYLOAD)),
    /// A masked frame where unmasked ones are required.
    MaskedFrame => ("masked_frame", Browser, true, None, CLOSE_PROTOCOL),

    // ---- the WebMKS backend leg (TLS + WebSocket client) ----------------------
    /// The backend's certificate does not match the ticket's thumbprint.
    BackendCertMismatch => ("backend_cert_mismatch", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    /// The backend's certificate is not trusted (no pin: roots or CA file).
    BackendCertUntrusted => ("backend_cert_untrusted", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    /// Any other TLS failure with the backend.
    BackendTls => ("backend_tls", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    /// The backend answered the upgrade with another status.
    BackendUpgradeRefused => ("backend_upgrade_refused", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    /// The backend's upgrade answer broke the rules (accept key,
    /// subprotocol, extensions, malformed, too large).
    BackendUpgradeInvalid => ("backend_upgrade_invalid", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    /// The backend's upgrade answer did not come in time.
    BackendUpgradeTimeout => ("backend_upgrade_timeout", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    /// The backend broke a WebSocket framing rule.
    BackendWsProtocol => ("backend_ws_protocol", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    /// The backend sent a close frame (its code and reason are relayed to
    /// the browser).
    BackendClosedWs => ("backend_closed_ws", Nobody, false, None, Some(close_code::NORMAL)),
    /// A target URL the appliance cannot use (configuration or hypervisor).
    BadTargetUrl => ("bad_target_url", Appliance, true, None, Some(close_code::INTERNAL_ERROR)),
    /// The appliance's own failure (no randomness, a bad option).
    Internal => ("internal", Appliance, true, Some(500), Some(close_code::INTERNAL_ERROR)),

    // ---- the appliance's own RFB security handshake --------------------------
    BackendNotRfb => ("backend_not_rfb", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    RfbUnsupportedVersion => ("rfb_unsupported_version", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    NoCommonSecurity => ("no_common_security", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    VncAuthFailed => ("auth_failed", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    BackendRefused => ("backend_refused", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    BackendRfbProtocol => ("backend_protocol", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    BrowserRfbProtocol => ("browser_protocol", Browser, true, None, CLOSE_PROTOCOL),
    RfbTooLong => ("too_long", Browser, true, None, CLOSE_PROTOCOL),
    RfbHandshakeTimeout => ("rfb_handshake_timeout", Backend, true, None, Some(close_code::INTERNAL_ERROR)),

    // ---- the relay ---------------------------------------------------------
    /// The browser's socket failed.
    BrowserIo => ("browser_io", Browser, true, None, None),
    /// The browser's TCP connection ended without a close frame.
    BrowserEofWithoutClose => ("browser_eof_without_close", Browser, true, None, None),
    BackendIo => ("backend_io", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    BackendConnectFailed => ("backend_connect_failed", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    BackendConnectTimeout => ("backend_connect_timeout", Backend, true, None, Some(close_code::INTERNAL_ERROR)),
    IdleTimeout => ("idle_timeout", Nobody, true, None, Some(close_code::GOING_AWAY)),
    /// The control plane revoked the session (DELETE, expiry).
    Revoked => ("revoked", Appliance, true, None, Some(close_code::POLICY)),
    /// Closed to make room in the viewer pool (`[viewers] when_full = "evict"`).
    Evicted => ("evicted", Appliance, false, None, Some(close_code::EVICTED)),
    /// The backend closed its connection (EOF): a normal end.
    BackendClosed => ("backend_closed", Nobody, false, None, Some(close_code::NORMAL)),
    /// The browser sent a close frame: a normal end.
    BrowserClosed => ("browser_closed", Nobody, false, None, None),
    /// SIGTERM: the appliance is shutting down.
    Drained => ("drained", Nobody, false, None, Some(close_code::GOING_AWAY)),

    // ---- the worker ----------------------------------------------------------
    OverSessionLimit => ("over_session_limit", Appliance, true, None, None),
    HandshakingOverLimit => ("handshaking_over_limit", Appliance, true, None, None),

    // ---- per-client-IP limits and the client address (`[rate_limits]`,
    // `[network]`; dataplane::client_limits). Refused before the upgrade:
    // 429 with Retry-After (1008 would be the close code of one found
    // after it).
    /// `handshakes_per_ip_per_s`: one client IP connects too fast.
    RateLimitedHandshakes => ("rate_limited_handshakes_per_ip", Browser, true, Some(429), Some(close_code::POLICY)),
    /// `handshaking_per_ip`: one client IP holds too many connections in
    /// their handshake.
    HandshakingPerIpOverLimit => ("handshaking_per_ip_over_limit", Browser, true, Some(429), Some(close_code::POLICY)),
    /// `handshaking_total`: too many connections in their handshake.
    HandshakingTotalOverLimit => ("handshaking_total_over_limit", Appliance, true, Some(429), Some(close_code::POLICY)),
    /// The client table had no slot for a new IP: served unlimited.
    ClientTableFull => ("client_table_full", Appliance, true, None, None),
    /// A PROXY header from an address not in `network.trusted_proxies`
    /// (closed, no answer).
    ProxyHeaderUntrusted => ("proxy_header_untrusted", Browser, true, None, None),
    /// A trusted proxy sent no PROXY header where one is required (closed).
    ProxyHeaderMissing => ("proxy_header_missing", Browser, true, None, None),
    /// A PROXY header that does not parse or is too long (closed).
    ProxyHeaderInvalid => ("proxy_header_invalid", Browser, true, None, None),
    AcceptFailed => ("accept_failed", Appliance, true, None, None),
    /// A report to the control plane was dropped (its queue was full).
    EventsDropped => ("events_dropped", Appliance, true, None, None),
    UringNoBuffers => ("uring_no_buffers", Appliance, true, None, None),
    SpliceUnsupported => ("splice_unsupported", Appliance, true, None, None),
    /// A static file could not be read while being sent.
    WebRead => ("web_read", Appliance, true, None, None),
}

impl Cause {
    /// The cause a console-by-URL refusal with this HTTP status (the
    /// control plane's answer) is counted as.
    pub fn of_console_status(status: u16) -> Cause {
        match status {
            401 => Cause::ConsoleUnauthorized,
            403 => Cause::ConsoleForbidden,
            404 => Cause::ConsoleVmNotFound,
            409 => Cause::ConsoleConflict,
            429 => Cause::ConsoleLimited,
            503 => Cause::ConsoleUnavailable,
            504 => Cause::ConsoleHypervisorTimeout,
            _ => Cause::ConsoleRefused,
        }
    }

    /// This cause's slot in a counter array.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Counts by cause: a fixed array indexed by [`Cause::index`], so counting
/// is one add, never a search.
#[derive(Debug, Clone)]
pub struct CauseCounts([u64; Cause::COUNT]);

impl Default for CauseCounts {
    fn default() -> Self {
        Self([0; Cause::COUNT])
    }
}

impl CauseCounts {
    pub fn add(&mut self, cause: Cause, n: u64) {
        self.0[cause.index()] += n;
    }

    pub fn get(&self, cause: Cause) -> u64 {
        self.0[cause.index()]
    }

    /// The non-zero counts, in index order.
    pub fn nonzero(&self) -> impl Iterator<Item = (Cause, u64)> + '_ {
        Cause::ALL
            .iter()
            .map(|&c| (c, self.0[c.index()]))
            .filter(|&(_, n)| n > 0)
    }

    pub fn merge(&mut self, other: &CauseCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }
}

impl From<&HttpError> for Cause {
    fn from(e: &HttpError) -> Self {
        match e {
            HttpError::Malformed(_) => Cause::Malformed,
            HttpError::TooLarge => Cause::RequestTooLarge,
            HttpError::MethodNotAllowed => Cause::MethodNotAllowed,
            HttpError::NotHttp11 => Cause::NotHttp11,
            HttpError::BadUpgrade(_) => Cause::BadUpgrade,
            HttpError::UnsupportedVersion => Cause::UnsupportedWsVersion,
            HttpError::BadKey => Cause::BadKey,
            HttpError::MissingHost => Cause::MissingHost,
            HttpError::BodyNotAllowed => Cause::BodyNotAllowed,
            HttpError::NoSupportedSubprotocol => Cause::NoSupportedSubprotocol,
            HttpError::UpgradeRefused { .. } => Cause::BackendUpgradeRefused,
            HttpError::ResponseMalformed(_)
            | HttpError::ResponseTooLarge
            | HttpError::ResponseNotHttp11
            | HttpError::BadUpgradeResponse(_)
            | HttpError::AcceptMismatch
            | HttpError::UnexpectedSubprotocol(_)
            | HttpError::MissingSubprotocol
            | HttpError::UnexpectedExtensions(_) => Cause::BackendUpgradeInvalid,
            HttpError::UrlScheme
            | HttpError::UrlUserinfo
            | HttpError::UrlFragment
            | HttpError::UrlPort
            | HttpError::UrlHost(_)
            | HttpError::UrlPath
            | HttpError::UrlTooLong => Cause::BadTargetUrl,
            HttpError::BadClientOption(_) | HttpError::RandomUnavailable(_) => Cause::Internal,
        }
    }
}

impl From<&WsError> for Cause {
    fn from(e: &WsError) -> Self {
        match e {
            WsError::UnmaskedFrame => Cause::UnmaskedFrame,
            WsError::ReservedBits(_) => Cause::ReservedBits,
            WsError::ReservedOpcode(_) => Cause::ReservedOpcode,
            WsError::FragmentedControl(_) => Cause::FragmentedControl,
            WsError::ControlTooLong(_) => Cause::ControlTooLong,
            WsError::UnexpectedContinuation => Cause::UnexpectedContinuation,
            WsError::ExpectedContinuation => Cause::ExpectedContinuation,
            WsError::LengthMsbSet => Cause::LengthMsbSet,
            WsError::FrameTooBig { .. } => Cause::FrameTooBig,
            WsError::InvalidUtf8 => Cause::InvalidUtf8,
            WsError::InvalidBase64 => Cause::InvalidBase64,
            WsError::Base64Truncated => Cause::Base64Truncated,
            WsError::BinaryInBase64Mode => Cause::BinaryInBase64Mode,
            WsError::BadClosePayload => Cause::BadClosePayload,
            WsError::InvalidCloseCode(_) => Cause::InvalidCloseCode,
            WsError::InvalidCloseReason => Cause::InvalidCloseReason,
            WsError::MaskedFrame => Cause::MaskedFrame,
            WsError::Backend(_) => Cause::BackendWsProtocol,
            WsError::RandomUnavailable(_) => Cause::Internal,
        }
    }
}

impl From<&RfbError> for Cause {
    fn from(e: &RfbError) -> Self {
        match e {
            RfbError::BackendNotRfb => Cause::BackendNotRfb,
            RfbError::UnsupportedVersion { .. } => Cause::RfbUnsupportedVersion,
            RfbError::NoCommonSecurity { .. } => Cause::NoCommonSecurity,
            RfbError::AuthFailed { .. } => Cause::VncAuthFailed,
            RfbError::BackendRefused { .. } => Cause::BackendRefused,
            RfbError::BackendProtocol(_) => Cause::BackendRfbProtocol,
            RfbError::BrowserProtocol(_) => Cause::BrowserRfbProtocol,
            RfbError::TooLong { side, .. } => match side {
                rfb::Side::Browser => Cause::RfbTooLong,
                rfb::Side::Backend => Cause::BackendRfbProtocol,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_unique_snake_case_and_indices_dense() {
        let mut seen = std::collections::HashSet::new();
        for (i, c) in Cause::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
            assert!(seen.insert(c.kind()), "duplicate kind {}", c.kind());
            assert!(
                c.kind()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                c.kind()
            );
        }
        assert_eq!(Cause::COUNT, seen.len());
    }

    #[test]
    fn refusals_have_statuses_and_ends_have_close_codes_as_documented() {
        assert_eq!(Cause::TicketExpired.status(), Some(410));
        assert_eq!(Cause::TicketReplay.status(), Some(403));
        assert_eq!(Cause::UnknownSession.status(), Some(404));
        assert_eq!(Cause::HandshakeTimeout.status(), Some(408));
        assert_eq!(Cause::Revoked.close_code(), Some(1008));
        assert_eq!(Cause::IdleTimeout.close_code(), Some(1001));
        assert_eq!(Cause::BackendClosed.close_code(), Some(1000));
        assert_eq!(Cause::BackendConnectFailed.close_code(), Some(1011));
        assert_eq!(Cause::FrameTooBig.close_code(), Some(1009));
        assert_eq!(Cause::InvalidUtf8.close_code(), Some(1007));
        assert!(!Cause::BackendClosed.is_error() && Cause::BackendIo.is_error());
        assert_eq!(Cause::BadTicket.side(), Side::Browser);
        assert_eq!(Cause::VncAuthFailed.side(), Side::Backend);
    }

    #[test]
    fn console_refusals_are_counted_by_their_status() {
        for status in [401, 403, 404, 409, 429, 503, 504] {
            assert_eq!(Cause::of_console_status(status).status(), Some(status));
        }
        assert_eq!(Cause::of_console_status(400), Cause::ConsoleRefused);
        assert_eq!(Cause::ConsoleTimeout.status(), Some(504));
    }

    #[test]
    fn the_protocol_errors_agree_with_their_causes() {
        for e in [
            WsError::UnmaskedFrame,
            WsError::InvalidUtf8,
            WsError::BinaryInBase64Mode,
        ] {
            assert_eq!(Cause::from(&e).close_code(), Some(e.close_code()), "{e}");
            assert_eq!(Cause::from(&e).kind(), e.kind());
        }
        let e = HttpError::UnsupportedVersion;
        assert_eq!(Cause::from(&e).status(), Some(e.status()));
    }

    #[test]
    fn counts_add_merge_and_list() {
        let mut a = CauseCounts::default();
        a.add(Cause::BadTicket, 2);
        let mut b = CauseCounts::default();
        b.add(Cause::BadTicket, 1);
        b.add(Cause::Revoked, 5);
        a.merge(&b);
        assert_eq!(a.get(Cause::BadTicket), 3);
        let v: Vec<_> = a.nonzero().collect();
        assert_eq!(v, vec![(Cause::BadTicket, 3), (Cause::Revoked, 5)]);
    }
}
