//! Fuzzes the websockify token-file parser (`dataplane::tokens::parse_into`,
//! what `TokenFile::load` and its reloads run on each file's bytes), in
//! strict (start-up) and lenient (reload) mode.
//!
//! Checks, besides "no panic": at most `max_tokens` tokens; every target has
//! a non-empty host without whitespace or brackets and a non-zero port;
//! every token is non-empty and trimmed; a strict error names a line of the
//! file; lenient mode fails only on the token cap and keeps every token a
//! strict parse keeps; each entry written back as `token: target` (the
//! target's `Display`) parses to the same entry.
//!
//! Input layout: `flags` (bits 0-1: which `max_tokens`), then the file.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use consolegate::dataplane::tokens::{parse_into, TokenError, TokenTarget};
use libfuzzer_sys::fuzz_target;

/// Token caps to try: none allowed, one, a few, the default's order.
const MAX_TOKENS: [usize; 4] = [0, 1, 4, 10_000];

fuzz_target!(|bytes: &[u8]| {
    let Some((&flags, file)) = bytes.split_first() else {
        return;
    };
    let max_tokens = MAX_TOKENS[usize::from(flags & 3)];
    let path = Path::new("fuzz.tokens");
    let mut strict = HashMap::new();
    let strict_result = parse_into(path, file, true, max_tokens, &mut strict);
    let mut lenient = HashMap::new();
    let lenient_result = parse_into(path, file, false, max_tokens, &mut lenient);
    // When strict parsing passed, its map must equal the lenient one
    // (checked below), so its entries are not checked twice.
    let checked: &[&HashMap<String, TokenTarget>] = if strict_result.is_ok() {
        &[&lenient]
    } else {
        &[&strict, &lenient]
    };
    for map in checked {
        assert!(
            map.len() <= max_tokens,
            "{} tokens over the cap {max_tokens}",
            map.len()
        );
        for (token, target) in *map {
            check_entry(token, target);
        }
    }
    match &strict_result {
        Ok(()) => {
            assert!(lenient_result.is_ok(), "lenient failed where strict passed");
            assert_eq!(strict, lenient, "lenient and strict disagree");
        }
        Err(TokenError::Parse { line, .. }) => {
            let lines = file.split(|&b| b == b'\n').count();
            assert!((1..=lines).contains(line), "line {line} of {lines}");
        }
        Err(TokenError::TooMany { max }) => assert_eq!(*max, max_tokens),
        Err(e) => panic!("parsing bytes gave an IO error: {e}"),
    }
    match lenient_result {
        Ok(()) | Err(TokenError::TooMany { .. }) => {}
        Err(e) => panic!("lenient parsing failed on a line: {e}"),
    }
});

fn check_entry(token: &str, target: &TokenTarget) {
    assert!(!token.is_empty(), "empty token");
    assert_eq!(token.trim(), token, "token not trimmed");
    assert_ne!(target.port, 0, "port 0");
    assert!(!target.host.is_empty(), "empty host");
    assert!(
        !target
            .host
            .contains(|c: char| c.is_whitespace() || c == '[' || c == ']'),
        "bad host {:?}",
        target.host
    );
    // The comment line keeps a token that starts with U+FEFF from being
    // taken for a byte order mark.
    let line = format!("# written back\n{token}: {target}\n");
    let mut again = HashMap::new();
    parse_into(Path::new("again"), line.as_bytes(), true, 1, &mut again)
        .unwrap_or_else(|e| panic!("written-back entry {line:?} does not parse: {e}"));
    assert_eq!(
        again.get(token),
        Some(target),
        "written-back entry {line:?} differs"
    );
}
