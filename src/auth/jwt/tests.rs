//! JWT edge cases: every refusal has its own kind, and a good token
//! becomes the right principal.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;
use crate::auth::AuthError;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";
const ISSUER: &str = "https://portal.test";
const AUDIENCE: &str = "consolegate";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

/// A secret file as the appliance wants it: 0600.
fn write_private(path: &std::path::Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    cfg: JwtConfig,
}

fn hs256() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    // A trailing newline is not part of the secret.
    let mut file = SECRET.to_vec();
    file.push(b'\n');
    write_private(&path, &file);
    Setup {
        cfg: JwtConfig {
            enabled: true,
            hs256_secret_file: Some(path),
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            leeway_ms: 5_000,
            ..JwtConfig::default()
        },
        _dir: dir,
    }
}

fn verifier(cfg: &JwtConfig) -> JwtVerifier {
    JwtVerifier::from_config(cfg).unwrap().unwrap()
}

fn claims(sub: &str, roles: serde_json::Value) -> serde_json::Value {
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 300, "roles": roles})
}

fn sign_hs(c: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        c,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

#[test]
fn a_good_token_is_its_user_with_the_highest_role() {
    let s = hs256();
    let v = verifier(&s.cfg);
    let p = v
        .verify(&sign_hs(&claims("alice", json!(["viewer", "operator"]))))
        .unwrap();
    assert_eq!((p.role, p.user.as_deref()), (Role::Operator, Some("alice")));
    assert_eq!(p.vms, VmGrant::All);
    let p = v
        .verify(&sign_hs(&claims("bob", json!("viewer unknown"))))
        .unwrap();
    assert_eq!(p.role, Role::Viewer);
    // A viewer without a vms claim may open no VM.
    assert_eq!(p.vms, VmGrant::Patterns(Vec::new()));
    let mut c = claims("carol", json!(["viewer"]));
    c["vms"] = json!(["web-*", "qemu:db-1"]);
    let p = v.verify(&sign_hs(&c)).unwrap();
    assert!(p.vms.allows(&["qemu:web-3", "web-3"]) && p.vms.allows(&["qemu:db-1", "db-1"]));
    assert!(!p.vms.allows(&["qemu:db-2", "db-2"]));
    // viewer_all_vms: every VM.
    let all = verifier(&JwtConfig {
        viewer_all_vms: true,
        ..s.cfg.clone()
    });
    assert_eq!(
        all.verify(&sign_hs(&claims("bob", json!("viewer"))))
            .unwrap()
            .vms,
        VmGrant::All
    );
    // Another roles claim name.
    let custom = verifier(&JwtConfig {
        roles_claim: "groups".into(),
        ..s.cfg.clone()
    });
    let mut c = claims("dave", json!("viewer"));
    c["groups"] = json!(["admin"]);
    assert_eq!(custom.verify(&sign_hs(&c)).unwrap().role, Role::Admin);
}

#[test]
fn time_claims_with_leeway() {
    let s = hs256();
    let v = verifier(&s.cfg);
    let mut c = claims("alice", json!("viewer"));
    // Expired 2 s ago: inside the 5 s leeway.
    c["exp"] = json!(now() - 2);
    v.verify(&sign_hs(&c)).unwrap();
    c["exp"] = json!(now() - 60);
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::Expired));
    let mut c = claims("alice", json!("viewer"));
    c["nbf"] = json!(now() + 60);
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::NotYetValid));
    c["nbf"] = json!(now() + 2);
    v.verify(&sign_hs(&c)).unwrap();
    // No exp at all: refused (a token that never expires is not accepted).
    let mut c = claims("alice", json!("viewer"));
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::BadClaim("exp")));
}

#[test]
fn issuer_audience_subject_and_roles_are_checked() {
    let s = hs256();
    let v = verifier(&s.cfg);
    let mut c = claims("alice", json!("viewer"));
    c["iss"] = json!("https://evil.test");
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::WrongIssuer));
    c.as_object_mut().unwrap().remove("iss");
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::WrongIssuer));
    let mut c = claims("alice", json!("viewer"));
    c["aud"] = json!("another-service");
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::WrongAudience));
    c["aud"] = json!(["another-service", AUDIENCE]);
    v.verify(&sign_hs(&c)).unwrap();
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::WrongAudience));
    let mut c = claims("", json!("viewer"));
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::BadClaim("sub")));
    c["sub"] = json!(42);
    assert!(v.verify(&sign_hs(&c)).is_err());
    let c = claims("alice", json!(["reader", "guest"]));
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::NoRole));
    let mut c = claims("alice", json!("viewer"));
    c.as_object_mut().unwrap().remove("roles");
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::NoRole));
    let mut c = claims("alice", json!("viewer"));
    c["vms"] = json!({"not": "a list"});
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::BadClaim("vms")));
    c["vms"] = json!(vec!["x"; MAX_VM_PATTERNS + 1]);
    assert_eq!(v.verify(&sign_hs(&c)), Err(AuthError::BadClaim("vms")));
}

#[test]
fn wrong_key_wrong_algorithm_none_and_malformed_are_refused() {
    let s = hs256();
    let v = verifier(&s.cfg);
    let c = claims("alice", json!("admin"));
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
    )
    .unwrap();
    assert_eq!(v.verify(&wrong_key), Err(AuthError::BadSignature));
    // The right secret under another HMAC: the algorithm is pinned.
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &c,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    assert_eq!(v.verify(&hs512), Err(AuthError::WrongAlgorithm));
    // alg "none" with no signature, and with the real signature kept.
    let b64 = |v: &serde_json::Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let body = b64(&c);
    let none_header = b64(&json!({"alg": "none", "typ": "JWT"}));
    let good = sign_hs(&c);
    let signature = good.rsplit('.').next().unwrap();
    for token in [
        format!("{none_header}.{body}."),
        format!("{none_header}.{body}.{signature}"),
    ] {
        let e = v.verify(&token).unwrap_err();
        assert!(
            matches!(e, AuthError::WrongAlgorithm | AuthError::Malformed),
            "{token}: {e:?}"
        );
    }
    for token in [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c",
        &format!("{}.{body}.{signature}", b64(&json!("just a string"))),
    ] {
        assert_eq!(v.verify(token), Err(AuthError::Malformed), "{token:?}");
    }
    // A bad body under a bad signature: the signature is checked first.
    let e = v.verify("eyJhbGciOiJIUzI1NiJ9.!!!.x").unwrap_err();
    assert!(
        matches!(e, AuthError::Malformed | AuthError::BadSignature),
        "{e:?}"
    );
    assert_eq!(
        v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)),
        Err(AuthError::Malformed)
    );
    // Tampered claims under the old signature.
    let mut tampered = c.clone();
    tampered["sub"] = json!("mallory");
    let forged = format!(
        "{}.{}.{signature}",
        good.split('.').next().unwrap(),
        b64(&tampered)
    );
    assert_eq!(v.verify(&forged), Err(AuthError::BadSignature));
}

#[test]
fn rs256_and_eddsa_verify_with_public_keys_only() {
    // RS256 with the fixture key pair.
    let cfg = JwtConfig {
        enabled: true,
        algorithm: JwtAlgorithm::RS256,
        public_key_file: Some(fixture("rs256-public.pem")),
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        ..JwtConfig::default()
    };
    let v = verifier(&cfg);
    let c = claims("alice", json!("viewer"));
    let sign_rs = |private: &str| {
        let pem = std::fs::read(fixture(private)).unwrap();
        jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &c,
            &EncodingKey::from_rsa_pem(&pem).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(
        v.verify(&sign_rs("rs256-private.pem")).unwrap().user,
        Some("alice".into())
    );
    assert_eq!(
        v.verify(&sign_rs("rs256-other-private.pem")),
        Err(AuthError::BadSignature)
    );
    // HS256 signed with the public key's bytes as the secret (the classic
    // key-confusion attack) is refused: the algorithm is pinned.
    let public = std::fs::read(fixture("rs256-public.pem")).unwrap();
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    assert_eq!(v.verify(&confused), Err(AuthError::WrongAlgorithm));

    // EdDSA with a fresh Ed25519 pair.
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let public_path = dir.path().join("ed.pem");
    std::fs::write(&public_path, pair.public_key_pem()).unwrap();
    let ed = verifier(&JwtConfig {
        algorithm: JwtAlgorithm::EdDSA,
        public_key_file: Some(public_path),
        ..cfg.clone()
    });
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &c,
        &EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(ed.verify(&token).unwrap().role, Role::Viewer);
    assert_eq!(
        ed.verify(&sign_rs("rs256-private.pem")),
        Err(AuthError::WrongAlgorithm)
    );
}

#[test]
fn key_files_are_checked_at_start() {
    let s = hs256();
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    write_private(&short, b"too-short\n");
    let e = JwtVerifier::from_config(&JwtConfig {
        hs256_secret_file: Some(short),
        ..s.cfg.clone()
    })
    .unwrap_err();
    assert!(e.to_string().contains("at least 32 bytes"), "{e}");
    let e = JwtVerifier::from_config(&JwtConfig {
        hs256_secret_file: Some(dir.path().join("missing")),
        ..s.cfg.clone()
    })
    .unwrap_err();
    assert!(
        matches!(e, KeyError::Secret(SecretError::Read { .. })),
        "{e}"
    );
    let e = JwtVerifier::from_config(&JwtConfig {
        algorithm: JwtAlgorithm::EdDSA,
        hs256_secret_file: None,
        public_key_file: Some(fixture("README.md")),
        ..s.cfg.clone()
    })
    .unwrap_err();
    assert!(matches!(e, KeyError::Bad { .. }), "{e}");
    assert!(JwtVerifier::from_config(&JwtConfig::default())
        .unwrap()
        .is_none());
}

#[test]
fn an_hs256_secret_others_may_read_is_refused_a_public_key_is_not() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = hs256();
    let path = s.cfg.hs256_secret_file.clone().unwrap();
    for mode in [0o644, 0o604, 0o602, 0o601] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = JwtVerifier::from_config(&s.cfg).unwrap_err().to_string();
        assert!(
            e.starts_with("auth.jwt.hs256_secret_file: ")
                && e.contains(&format!("(mode {mode:04o})"))
                && e.contains(&format!("chmod o-rwx {}", path.display())),
            "{e}"
        );
        assert!(!e.contains("0123456789abcdef"), "the secret leaked: {e}");
    }
    // Group-readable is fine (0640 root:consolegate).
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(JwtVerifier::from_config(&s.cfg).unwrap().is_some());
    // A world-readable public key is accepted.
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("public.pem");
    std::fs::copy(fixture("rs256-public.pem"), &public).unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = JwtConfig {
        algorithm: JwtAlgorithm::RS256,
        hs256_secret_file: None,
        public_key_file: Some(public),
        ..s.cfg.clone()
    };
    assert!(JwtVerifier::from_config(&cfg).unwrap().is_some());
}
