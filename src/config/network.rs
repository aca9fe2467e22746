//! `[network]`: who may speak for the client. Behind a load balancer the
//! TCP peer is the balancer; the client's address comes from the PROXY
//! protocol header (console port) or `X-Forwarded-For` (control port, and
//! the console port's upgrade request), and only when the peer is one of
//! `trusted_proxies`. The resulting client IP is what the per-IP limits,
//! the logs, a ticket's client binding and a session's recorded peer use.
//!
//! Plain values and their validation, like the rest of `config`; nothing
//! here depends on the planes.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::appliance::ConfigFileError;

/// Most entries in `network.trusted_proxies` (each connection is checked
/// against every entry).
pub const MAX_TRUSTED_PROXIES: usize = 64;

/// Whether the console port expects a PROXY protocol header (v1 or v2)
/// from a trusted proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolMode {
    /// No PROXY protocol: the TCP peer (or `X-Forwarded-For` from a
    /// trusted proxy) is the client.
    Off,
    /// A trusted proxy may send a header; without one, its connection is
    /// taken as its own (`X-Forwarded-For` still applies).
    Optional,
    /// A trusted proxy must send a header; its connections without one
    /// are closed (counted as `proxy_header_missing`).
    Required,
}

/// `[network]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Load balancers and reverse proxies whose word on the client address
    /// is taken: CIDRs (`10.0.0.0/8`) or single addresses (`127.0.0.1`).
    /// Empty (the default): nobody's; the TCP peer is the client.
    pub trusted_proxies: Vec<String>,
    /// The console port's PROXY protocol: `off`, `optional` or `required`
    /// (for connections from `trusted_proxies`). From any other address a
    /// PROXY header is refused: the connection is closed, counted as
    /// `proxy_header_untrusted` and logged. Cost: none for direct clients;
    /// the header (at most 107 bytes for v1, 1040 for v2) is read before
    /// anything else.
    pub console_proxy_protocol: ProxyProtocolMode,
    /// Take the client address from `X-Forwarded-For` when the TCP peer is
    /// a trusted proxy (the right-most address that is not itself a
    /// trusted proxy). Applies to the control port and to the console
    /// port's upgrade request when no PROXY header named the client; the
    /// console's per-IP limits then wait for the request head.
    pub forwarded_for: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            console_proxy_protocol: ProxyProtocolMode::Off,
            forwarded_for: true,
        }
    }
}

impl NetworkConfig {
    /// The trusted proxies as networks (a bare address is a /32 or /128).
    pub fn trusted_networks(&self) -> Result<Vec<IpNet>, ConfigFileError> {
        if self.trusted_proxies.len() > MAX_TRUSTED_PROXIES {
            return Err(invalid(
                "network.trusted_proxies",
                format!("at most {MAX_TRUSTED_PROXIES} entries"),
            ));
        }
        self.trusted_proxies
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        invalid(
                            "network.trusted_proxies",
                            format!("{entry:?} is not an address or a CIDR"),
                        )
                    })
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigFileError> {
        let nets = self.trusted_networks()?;
        if self.console_proxy_protocol != ProxyProtocolMode::Off && nets.is_empty() {
            return Err(invalid(
                "network.console_proxy_protocol",
                "needs network.trusted_proxies (a PROXY header is only ever taken from them)",
            ));
        }
        Ok(())
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigFileError {
    ConfigFileError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_reaches_network_and_per_ip_keys() {
        let mut c = super::super::appliance::ApplianceConfig::default();
        let vars = [
            (
                "CONSOLEGATE_NETWORK_TRUSTED_PROXIES",
                "10.0.0.0/8, 127.0.0.1",
            ),
            ("CONSOLEGATE_NETWORK_CONSOLE_PROXY_PROTOCOL", "required"),
            ("CONSOLEGATE_NETWORK_FORWARDED_FOR", "false"),
            ("CONSOLEGATE_RATE_LIMITS_REST_PER_IP_PER_S", "20"),
            ("CONSOLEGATE_RATE_LIMITS_HANDSHAKES_PER_IP_PER_S", "5"),
            ("CONSOLEGATE_RATE_LIMITS_HANDSHAKING_PER_IP", "4"),
            ("CONSOLEGATE_RATE_LIMITS_HANDSHAKING_TOTAL", "100"),
            ("CONSOLEGATE_RATE_LIMITS_MAX_TRACKED_IPS", "1024"),
        ];
        c.apply_env(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap();
        c.validate().unwrap();
        assert_eq!(c.network.trusted_proxies, vec!["10.0.0.0/8", "127.0.0.1"]);
        assert_eq!(
            c.network.console_proxy_protocol,
            ProxyProtocolMode::Required
        );
        assert!(!c.network.forwarded_for);
        let r = &c.rate_limits;
        assert_eq!(
            (
                r.rest_per_ip_per_s,
                r.handshakes_per_ip_per_s,
                r.handshaking_per_ip,
                r.handshaking_total,
                r.max_tracked_ips
            ),
            (20, 5, 4, 100, 1024)
        );
        let mut bad = super::super::appliance::ApplianceConfig::default();
        bad.rate_limits.max_tracked_ips = 1;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn trusted_proxies_parse_and_rules_name_their_key() {
        let c = NetworkConfig {
            trusted_proxies: vec!["127.0.0.1".into(), "10.1.2.3/8".into(), "::1".into()],
            console_proxy_protocol: ProxyProtocolMode::Required,
            forwarded_for: true,
        };
        c.validate().unwrap();
        let nets = c.trusted_networks().unwrap();
        assert_eq!(nets[0].to_string(), "127.0.0.1/32");
        assert_eq!(nets[1].to_string(), "10.0.0.0/8");
        assert_eq!(nets[2].to_string(), "::1/128");
        NetworkConfig::default().validate().unwrap();
        let key = |c: NetworkConfig| match c.validate().unwrap_err() {
            ConfigFileError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        };
        assert_eq!(
            key(NetworkConfig {
                trusted_proxies: vec!["10.0.0.0/33".into()],
                ..NetworkConfig::default()
            }),
            "network.trusted_proxies"
        );
        assert_eq!(
            key(NetworkConfig {
                console_proxy_protocol: ProxyProtocolMode::Optional,
                ..NetworkConfig::default()
            }),
            "network.console_proxy_protocol"
        );
        assert_eq!(
            key(NetworkConfig {
                trusted_proxies: vec!["127.0.0.1".into(); MAX_TRUSTED_PROXIES + 1],
                ..NetworkConfig::default()
            }),
            "network.trusted_proxies"
        );
    }
}
