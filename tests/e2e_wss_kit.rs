//! The WebMKS test kit's own tests (tests/common/wss_backend.rs and the
//! wmks.js harness in tests/common/browser.rs).

#[macro_use]
mod common;

use common::wss_backend::*;
use common::*;

#[test]
fn thumbprints_are_in_vmware_format() {
    let backend = WssBackend::start(Behaviour::Echo);
    assert_eq!(backend.thumbprint_sha1().len(), 59);
    assert_eq!(backend.thumbprint_sha256().len(), 95);
}
