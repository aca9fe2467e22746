//! Fuzzes the control API's JSON request bodies: `POST /api/v1/sessions`
//! (`control::api::CreateReq`, with its nested `TargetReq`) parsed the way
//! axum's `Json` extractor does, with `serde_json::from_slice`.
//!
//! The request types are `Deserialize` only, so the re-serialising check
//! goes through `serde_json::Value`: a body that parses must also parse as a
//! `Value`, and that `Value` written back out must parse to the same request
//! (same fields, same values) — so a body a proxy or a client library
//! re-encodes means the same thing to us.
//!
//! Input layout: the body bytes as they arrive.
#![no_main]

use consolegate::control::api::{CreateReq, TargetReq};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<CreateReq>(body) {
        let again: CreateReq = reencoded(body).expect("re-encoded CreateReq must parse");
        assert_eq!(
            format!("{request:?}"),
            format!("{again:?}"),
            "re-encoding changed it"
        );
    }
    if let Ok(target) = serde_json::from_slice::<TargetReq>(body) {
        let again: TargetReq = reencoded(body).expect("re-encoded TargetReq must parse");
        assert_eq!(
            format!("{target:?}"),
            format!("{again:?}"),
            "re-encoding changed it"
        );
    }
});

/// `body` parsed as a generic JSON value, written out again, and parsed as
/// `T`.
fn reencoded<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    let value: serde_json::Value =
        serde_json::from_slice(body).expect("a body that parses as a request is valid JSON");
    let text = serde_json::to_vec(&value).expect("a JSON value always serialises");
    serde_json::from_slice(&text)
}
