//! End-to-end: the appliance (`consolegate run`, `consolegate check-config`)
//! refuses every secret file that others may access — the console's TLS
//! key, the JWT HS256 secret, a hypervisor password file — with a non-zero
//! exit and a message naming the config key, the file, its mode and the
//! `chmod o-rwx` that fixes it; with the files 0600 / 0640 it starts and
//! answers. (The unit tests of `config::secrets`, `auth::jwt` and the
//! hypervisors check each reader; this checks the binary's start.)

#[macro_use]
mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// The HS256 secret (at least 32 bytes).
const JWT_SECRET: &str = "e2e-secrets-jwt-0123456789abcdef0123456789";
/// Longest a refused start or a check may take (the binary exits as soon as
/// it has read its config).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn write_with_mode(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The secret files of the test config, by the key that names them.
struct Secrets {
    tls_key: PathBuf,
    jwt_secret: PathBuf,
    vnc_password: PathBuf,
}

/// A test appliance's options with `[tls]`, HS256 JWTs and a static VM
/// whose VNC password is in a file.
fn options(cert: &TestCert, secrets: &Secrets) -> ApplianceOptions {
    ApplianceOptions {
        tls: Some((cert.cert_path.clone(), secrets.tls_key.clone())),
        tls_toml: "allow_plain = true".into(),
        extra_toml: format!(
            "\n[auth.jwt]\nenabled = true\nalgorithm = \"HS256\"\nhs256_secret_file = {:?}\n\
             issuer = \"e2e\"\naudience = \"consolegate\"\n\
             \n[[hypervisors]]\nkind = \"static\"\nid = \"lab\"\n\
             vms = [{{ id = \"x1\", host = \"127.0.0.1\", port = 5999, password_file = {:?} }}]\n",
            secrets.jwt_secret.display().to_string(),
            secrets.vnc_password.display().to_string(),
        ),
        ..ApplianceOptions::default()
    }
}

#[test]
fn the_appliance_refuses_secret_files_others_may_read_and_starts_with_private_ones() {
    let cert = TestCert::generate();
    let dir = tempfile::Builder::new()
        .prefix("consolegate-secrets-")
        .tempdir()
        .unwrap();
    let secrets = Secrets {
        tls_key: dir.path().join("key.pem"),
        jwt_secret: dir.path().join("jwt.secret"),
        vnc_password: dir.path().join("x1.password"),
    };
    fs::copy(&cert.key_path, &secrets.tls_key).unwrap();
    chmod(&secrets.tls_key, 0o600);
    write_with_mode(&secrets.jwt_secret, &format!("{JWT_SECRET}\n"), 0o600);
    // Group-readable is fine (the package's 0640 root:consolegate).
    write_with_mode(&secrets.vnc_password, "vnc-pw\n", 0o640);
    let opts = options(&cert, &secrets);
    let config = dir.path().join("consolegate.toml");
    fs::write(
        &config,
        appliance_config_text(
            "epoll",
            reserve_port_range(4),
            &dir.path().join("state"),
            &opts,
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();

    let (st, out, err) = run_cli_env(
        &["check-config", "--config", &config_arg],
        &[],
        EXIT_TIMEOUT,
    );
    assert!(
        st.success(),
        "check-config with private files: {st}\n{out}{err}"
    );

    let cases = [
        ("tls.key", &secrets.tls_key, 0o644, 0o600),
        (
            "auth.jwt.hs256_secret_file",
            &secrets.jwt_secret,
            0o604,
            0o600,
        ),
        (
            "hypervisors[0].vms[0].password_file",
            &secrets.vnc_password,
            0o646,
            0o640,
        ),
    ];
    for (key, path, open_mode, private_mode) in cases {
        chmod(path, open_mode);
        let expected = format!(
            "{key}: {} holds a secret but others have access to it (mode {open_mode:04o}): refused; \
             run: chmod o-rwx {}",
            path.display(),
            path.display()
        );
        for command in ["check-config", "run"] {
            let (st, out, err) =
                run_cli_env(&[command, "--config", &config_arg], &[], EXIT_TIMEOUT);
            assert_eq!(
                st.code(),
                Some(1),
                "{command} with {key} mode {open_mode:o} must exit 1: {st}\n{out}{err}"
            );
            assert!(
                err.contains(&expected),
                "{command}: the error must name the key, file, mode and fix:\n\
                 expected: {expected}\nstderr: {err}"
            );
            assert!(
                !out.contains("listening on") && !err.contains(JWT_SECRET),
                "{command}: started or leaked the secret:\n{out}{err}"
            );
        }
        chmod(path, private_mode);
    }

    // All private again: the appliance starts, answers, and the API takes
    // the admin token.
    let app = Appliance::start("epoll", opts);
    let health = app.get("/healthz");
    assert_eq!(health.status, 200, "GET /healthz: {health:?}");
    let vms = app.get_json("/api/v1/vms");
    assert!(
        vms.to_string().contains("x1"),
        "the static VM with the password file is listed: {vms}"
    );
}
