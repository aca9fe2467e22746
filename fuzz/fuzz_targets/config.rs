//! Fuzzes the appliance config parser: TOML text through
//! `ApplianceConfig::from_toml_str` (what `load` runs on the file's text),
//! then `CONSOLEGATE_*` environment overrides through `apply_env`, then
//! `validate` (which runs the data plane's own `ProxyConfig::validate` too).
//!
//! Checks, besides "no panic": a config that validates, written back as
//! TOML, parses again to the same config and validates again (the round
//! trip is skipped for configs the appliance would refuse, which halves the
//! cost of the common case); a failed
//! `apply_env` leaves the config exactly as it was ("on error nothing is
//! applied"); every error has a message.
//!
//! Input layout: the TOML text, optionally followed by a NUL byte and
//! `NAME=VALUE` lines (the environment). TOML text cannot hold a raw NUL, so
//! the separator costs the parser nothing.
#![no_main]

use consolegate::config::appliance::ApplianceConfig;
use libfuzzer_sys::fuzz_target;

/// Environment variables per input: bounds the work of one run.
const MAX_VARS: usize = 32;

fuzz_target!(|bytes: &[u8]| {
    let (text, env) = match bytes.iter().position(|&b| b == 0) {
        Some(at) => (&bytes[..at], &bytes[at + 1..]),
        None => (bytes, &[][..]),
    };
    // `load` reads the file into a String: non-UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let mut config = match ApplianceConfig::from_toml_str(text) {
        Ok(config) => config,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    check_round_trip(&config);
    let vars = environment(env);
    if vars.is_empty() {
        return;
    }
    let before = to_toml(&config);
    match config.apply_env(vars) {
        Ok(()) => {
            check_round_trip(&config);
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert_eq!(
                to_toml(&config),
                before,
                "a failed apply_env changed the config"
            );
        }
    }
});

/// Validate; if valid, serialise, parse again, compare, and validate again.
fn check_round_trip(config: &ApplianceConfig) {
    if let Err(e) = config.validate() {
        assert!(!e.to_string().is_empty());
        return;
    }
    let text = to_toml(config);
    let again = ApplianceConfig::from_toml_str(&text)
        .unwrap_or_else(|e| panic!("written config does not parse: {e}\n{text}"));
    assert_eq!(to_toml(&again), text, "the config changed through TOML");
    if let Err(e) = again.validate() {
        panic!("a valid config fails validation after the round trip: {e}\n{text}");
    }
}

fn to_toml(config: &ApplianceConfig) -> String {
    toml::to_string(config).expect("a parsed config serialises")
}

/// `NAME=VALUE` lines; lines without `=` are skipped.
fn environment(env: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(env)
        .lines()
        .filter_map(|line| line.split_once('='))
        .take(MAX_VARS)
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}
