//! The HTTP leg of the vSphere client: SOAP calls and screenshot GETs over
//! hyper-util's pooled HTTP/1.1 client on rustls (hyper-rustls, with the
//! `pki` module's client configuration), every response bounded in size
//! and every request in time; transport failures become typed errors (a
//! refused certificate is `Certificate`, a dead host `Unreachable`).
//!
//! Why hyper-util's client and not reqwest: it is the hyper stack axum
//! already compiles, it takes a prepared `rustls::ClientConfig` as it is,
//! and the backend needs nothing reqwest adds (a cookie jar, redirects,
//! URL parsing with IDNA): one cookie is carried explicitly.
//!
//! It knows HTTP and cookies, not the meaning of the calls (see `soap`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use http::{Method, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::soap::{self, Element};
use crate::hypervisor::model::{HvResult, HypervisorError};
use crate::pki;

/// The session cookie of the vSphere API.
pub const SESSION_COOKIE: &str = "vmware_soap_session";
/// Largest SOAP response read, in bytes: a VM list page of 1000 VMs is
/// ~300 KB; 16 MiB leaves room without letting a broken host fill memory.
pub const MAX_SOAP_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Largest screenshot read, in bytes (a 4K PNG is a few MB).
pub const MAX_SCREEN_BYTES: usize = 32 * 1024 * 1024;
/// How long an idle keep-alive connection to the host is kept.
pub const HTTP_IDLE_TIMEOUT_MS: u64 = 90_000;
/// Idle keep-alive connections kept per host.
pub const HTTP_MAX_IDLE_PER_HOST: usize = 8;
/// The API version named in `SOAPAction`: 6.7's is understood by every
/// host from 6.7 to 8.x, and the calls used here exist since 5.x.
pub const SOAP_ACTION: &str = "urn:vim25/6.7";

/// A SOAP answer: the Body's first element (the `…Response`), and the
/// session cookie when the host set one (Login).
#[derive(Debug)]
pub struct Answer {
    pub root: Element,
    pub session_cookie: Option<String>,
}

impl Answer {
    /// The `…Response` element (faults were already turned into errors).
    pub fn result(&self) -> HvResult<&Element> {
        soap::body_result(&self.root).map_err(|f| soap::map_fault(&f, None))
    }
}

pub struct SoapClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: Uri,
    /// `https://host:port`, for `/screen`.
    origin: String,
    /// The endpoint's host, for tickets that name none.
    host: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for SoapClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoapClient")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl SoapClient {
    /// A client of `url` (`https://host[:port]/sdk`), trusting the API
    /// endpoint's certificate as `tls` says.
    pub fn new(
        url: &str,
        tls: Arc<rustls::ClientConfig>,
        request_timeout: Duration,
    ) -> Result<SoapClient, String> {
        let endpoint: Uri = url.parse().map_err(|e| format!("url {url:?}: {e}"))?;
        if endpoint.scheme_str() != Some("https") {
            return Err(format!("url {url:?} must be https://"));
        }
        let authority = endpoint
            .authority()
            .ok_or_else(|| format!("url {url:?} has no host"))?
            .clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_only()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(HTTP_IDLE_TIMEOUT_MS))
            .pool_max_idle_per_host(HTTP_MAX_IDLE_PER_HOST)
            .build(connector);
        Ok(SoapClient {
            http,
            origin: format!("https://{authority}"),
            endpoint,
            host,
            request_timeout,
        })
    }

    /// The API endpoint's host name or address (no brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Posts a SOAP request; `cookie` is the session's cookie value.
    /// Faults come back as errors (see [`soap::map_fault`]); `vm` names
    /// the VM a call is about, for `VmNotFound`.
    pub async fn call(
        &self,
        body: Vec<u8>,
        cookie: Option<&str>,
        vm: Option<&str>,
    ) -> HvResult<Answer> {
        let mut request = http::Request::builder()
            .method(Method::POST)
            .uri(self.endpoint.clone())
            .header(CONTENT_TYPE, "text/xml; charset=utf-8")
            .header("SOAPAction", SOAP_ACTION);
        if let Some(cookie) = cookie {
            request = request.header(COOKIE, format!("{SESSION_COOKIE}={cookie}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| HypervisorError::Protocol(format!("bad request: {e}")))?;
        let (status, headers, body) = self.send(request, MAX_SOAP_RESPONSE_BYTES).await?;
        let session_cookie = headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(session_cookie_value);
        match status {
            StatusCode::OK | StatusCode::INTERNAL_SERVER_ERROR => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                return Err(HypervisorError::Unreachable(
                    "the API answered 503 (overloaded, or out of sessions)".into(),
                ))
            }
            other => {
                return Err(HypervisorError::Protocol(format!(
                    "the API answered HTTP {other}"
                )))
            }
        }
        let root = soap::parse(&body)?;
        if let Err(fault) = soap::body_result(&root) {
            return Err(soap::map_fault(&fault, vm));
        }
        Ok(Answer {
            root,
            session_cookie,
        })
    }

    /// `GET /screen?id=vm-N` with the session cookie: the status and body.
    pub async fn screen(&self, vm: &str, cookie: &str) -> HvResult<(StatusCode, Vec<u8>)> {
        let uri: Uri = format!("{}/screen?id={}", self.origin, query_escape(vm))
            .parse()
            .map_err(|e| HypervisorError::Protocol(format!("bad screen URL: {e}")))?;
        let request = http::Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header(COOKIE, format!("{SESSION_COOKIE}={cookie}"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| HypervisorError::Protocol(format!("bad request: {e}")))?;
        let (status, _, body) = self.send(request, MAX_SCREEN_BYTES).await?;
        Ok((status, body))
    }

    /// Sends a request and reads its body (at most `max_bytes`), all
    /// within the request timeout.
    async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
        max_bytes: usize,
    ) -> HvResult<(StatusCode, http::HeaderMap, Vec<u8>)> {
        let exchange = async {
            let response = self.http.request(request).await.map_err(transport_error)?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, max_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        HypervisorError::Protocol(format!(
                            "the response is larger than {max_bytes} bytes"
                        ))
                    } else {
                        HypervisorError::Unreachable(format!("reading the response: {e}"))
                    }
                })?
                .to_bytes();
            Ok((parts.status, parts.headers, body.to_vec()))
        };
        match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HypervisorError::Timeout(self.request_timeout)),
        }
    }
}

/// The value of `vmware_soap_session` in a Set-Cookie header, as sent
/// (vCenter quotes it; the quotes are part of what it expects back).
fn session_cookie_value(header: &str) -> Option<String> {
    let first = header.split(';').next()?.trim();
    let (name, value) = first.split_once('=')?;
    (name.trim() == SESSION_COOKIE && !value.is_empty()).then(|| value.to_string())
}

/// Percent-escapes everything but unreserved characters (a managed object
/// id is `vm-57`; anything else is escaped rather than trusted).
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A failed exchange: a refused certificate, or an unreachable host.
fn transport_error(error: hyper_util::client::legacy::Error) -> HypervisorError {
    if let Some(tls) = pki::find_tls_error(&error) {
        if let Some(problem) = pki::classify(tls) {
            return HypervisorError::Certificate(format!("{}: {tls}", problem.code()));
        }
        return HypervisorError::Unreachable(format!("TLS: {tls}"));
    }
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    // Name the root cause (connection refused…); chains are short.
    for _ in 0..8 {
        let Some(s) = source else { break };
        message = format!("{message}: {s}");
        source = s.source();
    }
    HypervisorError::Unreachable(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_as_sent() {
        assert_eq!(
            session_cookie_value("vmware_soap_session=\"52a1\"; Path=/; HttpOnly; Secure"),
            Some("\"52a1\"".to_string())
        );
        assert_eq!(
            session_cookie_value("vmware_soap_session=abc-1; HttpOnly"),
            Some("abc-1".to_string())
        );
        assert_eq!(session_cookie_value("other=1; vmware_soap_session=x"), None);
        assert_eq!(session_cookie_value("vmware_soap_session="), None);
    }

    #[test]
    fn screen_ids_are_escaped() {
        assert_eq!(query_escape("vm-57"), "vm-57");
        assert_eq!(query_escape("vm 1&x=2"), "vm%201%26x%3D2");
    }

    #[test]
    fn only_https_urls_are_accepted() {
        let tls = pki::client_config(&pki::Trust::Pinned(
            pki::Thumbprint::parse(&"00".repeat(20)).unwrap(),
        ))
        .unwrap();
        let timeout = Duration::from_secs(1);
        assert!(SoapClient::new("http://h/sdk", tls.clone(), timeout).is_err());
        assert!(SoapClient::new("not a url", tls.clone(), timeout).is_err());
        let c = SoapClient::new("https://[::1]:8443/sdk", tls, timeout).unwrap();
        assert_eq!(c.host(), "::1");
        assert_eq!(c.origin, "https://[::1]:8443");
    }
}
