//! Where a browser's upgrade request is relayed to: one fixed backend, or
//! websockify's token file (`?token=`).
//!
//! Each worker owns its router (no shared state). Must not depend on the IO
//! backends.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Instant;

use crate::dataplane::tokens::TokenFile;
use crate::protocol::http_upgrade::{query_param, Upgrade};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("the URL has no ?token= parameter")]
    MissingToken,
    #[error("unknown token")]
    UnknownToken,
    #[error("the token's target {0} does not resolve")]
    Unresolvable(String),
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            Self::MissingToken => 400,
            Self::UnknownToken => 404,
            Self::Unresolvable(_) => 502,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::UnknownToken => "unknown_token",
            Self::Unresolvable(_) => "target_unresolvable",
        }
    }
}

pub enum Router {
    Fixed(SocketAddr),
    Tokens(Box<TokenFile>),
}

impl Router {
    /// The backend for this upgrade request.
    pub fn route(&mut self, up: &Upgrade, now: Instant) -> Result<SocketAddr, RouteError> {
        match self {
            Self::Fixed(addr) => Ok(*addr),
            Self::Tokens(file) => {
                let token = up
                    .query
                    .as_deref()
                    .and_then(|q| query_param(q, "token"))
                    .ok_or(RouteError::MissingToken)?;
                let target = file.lookup(&token, now).ok_or(RouteError::UnknownToken)?;
                resolve(&target.host, target.port)
            }
        }
    }
}

/// An IP literal is used as is. A host name is resolved with the system
/// resolver, which blocks this worker for the lookup: acceptable for the
/// websockify-compatible token file (operators write addresses there), and
/// the reason the appliance mode resolves on the control plane instead.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, RouteError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| RouteError::Unresolvable(format!("{host}:{port}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_resolve_without_lookup() {
        assert_eq!(
            resolve("127.0.0.1", 5900).unwrap(),
            "127.0.0.1:5900".parse().unwrap()
        );
        assert_eq!(
            resolve("[::1]", 5901).unwrap(),
            "[::1]:5901".parse().unwrap()
        );
        assert_eq!(resolve("localhost", 1).unwrap().port(), 1);
    }

    #[test]
    fn route_errors_map_to_statuses() {
        assert_eq!(RouteError::UnknownToken.status(), 404);
        assert_eq!(RouteError::MissingToken.status(), 400);
        assert_eq!(RouteError::UnknownToken.kind(), "unknown_token");
    }
}
