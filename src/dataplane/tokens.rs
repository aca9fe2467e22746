//! websockify's `TokenFile` target plugin: maps a session token (from the
//! `?token=` query) to a VNC `host:port`, read from `--token-source`, which is
//! one file or a directory of files with lines like
//!
//! ```text
//! # comment
//! vm-101: 10.0.0.5:5901
//! vm-102 : [fd00::7]:5900
//! ```
//!
//! websockify re-reads the source on every lookup so that operators can edit
//! it live. A worker must not hit the disk for every connection, so a
//! [`TokenFile`] checks the source's modification stamps at most once per
//! reload interval (measured on the `now` the caller passes in: this module
//! reads no clock) and re-reads only when they changed. A failed reload keeps
//! the previous table: an operator's half-saved edit must never disconnect
//! every console.
//!
//! The workers never touch the file system or the resolver for this: a
//! loader thread ([`spawn_loader`]) owns the [`TokenFile`], checks its
//! stamps once per reload interval, resolves every host name in it (and
//! again every [`RERESOLVE_INTERVAL`]), and publishes the result as one
//! immutable [`ResolvedTokens`] that workers read without a lock
//! (`arc-swap`). A token holder cannot stall a worker with a slow DNS name.
//! `max_file_bytes` / `max_tokens` bound the loader's work. It must not
//! depend on any other consolegate module.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Where a token sends the browser: a VNC server address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenTarget {
    /// Host name or IP literal; IPv6 literals are stored without brackets.
    pub host: String,
    /// TCP port, never 0.
    pub port: u16,
}

impl fmt::Display for TokenTarget {
    /// `host:port`, bracketing IPv6 literals so the result parses as a
    /// socket address.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why the token source could not be (re)loaded. The failing side is always
/// the operator's configuration.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The source or one of its files could not be listed, stat'ed or read.
    #[error("token source {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A line is not `token: host:port`.
    #[error("token source {} line {line}: {message}", path.display())]
    Parse {
        /// The file holding the line.
        path: PathBuf,
        /// 1-based line number within that file.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The source defines more distinct tokens than `max_tokens`.
    #[error("token source defines more than {max} tokens")]
    TooMany {
        /// The configured `max_tokens`.
        max: usize,
    },
    /// A file is larger than `max_file_bytes`.
    #[error("token file {} is larger than {max_bytes} bytes", path.display())]
    TooLarge {
        /// The oversized file.
        path: PathBuf,
        /// The configured `max_file_bytes`.
        max_bytes: u64,
    },
}

/// What we remember about one file to notice edits without reading it.
/// Length and inode catch the edits an mtime with coarse granularity can
/// miss (a rewrite within the same tick, an atomic rename-over).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    path: PathBuf,
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// A live-reloading token table. Not shared: each worker owns one (lookups
/// take `&mut self` to update the reload bookkeeping without a lock).
#[derive(Debug)]
pub struct TokenFile {
    source: PathBuf,
    reload_interval: Duration,
    last_check: Option<Instant>,
    /// Stamps of the files the current table was read from, sorted by path.
    /// A directory's file set is part of it, so adding, removing or renaming
    /// a file also triggers a reload.
    fingerprint: Vec<Stamp>,
    map: HashMap<String, TokenTarget>,
    max_tokens: usize,
    max_file_bytes: u64,
    /// The last reload error logged, so a persistent failure (say, the file
    /// was deleted) is logged once rather than once per interval.
    last_error: Option<String>,
}

impl TokenFile {
    /// Load now; a missing source or a parse error is an error at start-up
    /// (the message names the path and line).
    ///
    /// * `reload_interval_ms`: least time between two checks of the source's
    ///   stamps; 0 checks on every lookup, like websockify (one `stat` per
    ///   file per lookup).
    /// * `max_tokens`: most distinct tokens across all files.
    /// * `max_file_bytes`: largest single file read; bounds the memory and
    ///   time one reload can take on a worker thread.
    pub fn load(
        source: &Path,
        reload_interval_ms: u64,
        max_tokens: usize,
        max_file_bytes: u64,
    ) -> Result<Self, TokenError> {
        let mut tf = TokenFile {
            source: source.to_path_buf(),
            reload_interval: Duration::from_millis(reload_interval_ms),
            last_check: None,
            fingerprint: Vec::new(),
            map: HashMap::new(),
            max_tokens,
            max_file_bytes,
            last_error: None,
        };
        let stamps = snapshot(source)?;
        tf.map = tf.read_all(&stamps, true)?;
        tf.fingerprint = stamps;
        Ok(tf)
    }

    /// Look up a token, first re-reading the source if the reload interval
    /// has passed since the last check and its stamps changed. A reload
    /// error keeps the old table and is logged; bad lines found on reload
    /// are skipped with a warning, as websockify does.
    pub fn lookup(&mut self, token: &str, now: Instant) -> Option<TokenTarget> {
        let due = match self.last_check {
            None => true,
            Some(last) => now.saturating_duration_since(last) >= self.reload_interval,
        };
        if due {
            self.last_check = Some(now);
            self.refresh();
        }
        self.map.get(token).cloned()
    }

    /// Re-read the source if the reload interval has passed and its stamps
    /// changed; true when the table changed.
    pub fn poll(&mut self, now: Instant) -> bool {
        let before = self.fingerprint.clone();
        let _ = self.lookup("", now);
        self.fingerprint != before
    }

    /// The current table.
    pub fn targets(&self) -> &HashMap<String, TokenTarget> {
        &self.map
    }

    /// Number of tokens in the current table.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when the current table holds no token.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Re-read the source if its stamps changed; on error keep the table.
    fn refresh(&mut self) {
        // Stamp before reading: an edit landing between the two leaves a
        // stale fingerprint, which only costs one extra reload next time.
        // Reading first could miss that edit for good.
        let result = snapshot(&self.source).and_then(|stamps| {
            if stamps == self.fingerprint {
                return Ok(None);
            }
            let map = self.read_all(&stamps, false)?;
            Ok(Some((stamps, map)))
        });
        match result {
            Ok(None) => self.clear_error(),
            Ok(Some((stamps, map))) => {
                tracing::info!(
                    source = %self.source.display(),
                    tokens = map.len(),
                    "token source reloaded"
                );
                self.fingerprint = stamps;
                self.map = map;
                self.clear_error();
            }
            Err(e) => {
                let msg = e.to_string();
                if self.last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(
                        source = %self.source.display(),
                        error = %msg,
                        kept_tokens = self.map.len(),
                        "token source reload failed; keeping the previous table"
                    );
                    self.last_error = Some(msg);
                }
            }
        }
    }

    fn clear_error(&mut self) {
        if self.last_error.take().is_some() {
            tracing::info!(source = %self.source.display(), "token source readable again");
        }
    }

    /// Read and parse every file in `stamps`. `strict` turns a bad line into
    /// an error (start-up) instead of a skipped line (reload).
    fn read_all(
        &self,
        stamps: &[Stamp],
        strict: bool,
    ) -> Result<HashMap<String, TokenTarget>, TokenError> {
        let mut map = HashMap::new();
        for stamp in stamps {
            let bytes = read_bounded(&stamp.path, self.max_file_bytes)?;
            parse_into(&stamp.path, &bytes, strict, self.max_tokens, &mut map)?;
        }
        Ok(map)
    }
}

/// How often the loader resolves the host names again although the file did
/// not change (DNS records change on their own).
pub const RERESOLVE_INTERVAL: Duration = Duration::from_secs(60);

/// The token table as workers read it: every target resolved, or the reason
/// it does not resolve (answered 502 to the browser).
#[derive(Debug, Default)]
pub struct ResolvedTokens {
    map: HashMap<String, Result<std::net::SocketAddr, String>>,
}

impl ResolvedTokens {
    /// Resolve every target of `targets` (each distinct name once).
    pub fn resolve(targets: &HashMap<String, TokenTarget>) -> Self {
        let mut names: HashMap<&TokenTarget, Result<std::net::SocketAddr, String>> = HashMap::new();
        let map = targets
            .iter()
            .map(|(token, t)| {
                let addr = names.entry(t).or_insert_with(|| resolve_target(t)).clone();
                (token.clone(), addr)
            })
            .collect();
        Self { map }
    }

    /// The target of `token`: None for an unknown token, `Err` for one whose
    /// host did not resolve.
    pub fn get(&self, token: &str) -> Option<&Result<std::net::SocketAddr, String>> {
        self.map.get(token)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What the workers share: the latest resolved table.
pub type SharedTokens = std::sync::Arc<arc_swap::ArcSwap<ResolvedTokens>>;

/// An IP literal as is; a name through the system resolver (blocking: only
/// ever called on the loader thread).
fn resolve_target(t: &TokenTarget) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = t.host.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, t.port));
    }
    (t.host.as_str(), t.port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| format!("{t} does not resolve"))
}

/// Resolve `file`'s table now, then start the loader thread that keeps it
/// current: it polls the source every `reload_interval` (at least 100 ms
/// between polls), re-resolves names every [`RERESOLVE_INTERVAL`], and
/// stops once `stop()` says so.
pub fn spawn_loader(
    mut file: TokenFile,
    stop: impl Fn() -> bool + Send + 'static,
) -> io::Result<SharedTokens> {
    let shared: SharedTokens = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(
        ResolvedTokens::resolve(file.targets()),
    ));
    let out = shared.clone();
    let pause = file.reload_interval.max(Duration::from_millis(100));
    std::thread::Builder::new()
        .name("cg-tokens".into())
        .spawn(move || {
            let mut resolved_at = Instant::now();
            while !stop() {
                std::thread::sleep(pause);
                let now = Instant::now();
                let changed = file.poll(now);
                if changed || now.duration_since(resolved_at) >= RERESOLVE_INTERVAL {
                    shared.store(std::sync::Arc::new(ResolvedTokens::resolve(file.targets())));
                    resolved_at = now;
                }
            }
        })?;
    Ok(out)
}

/// Stamps of the files making up `source`: the file itself, or every regular
/// file in the directory (following symlinks, like websockify's `open`),
/// sorted by path so that "last definition wins" is deterministic.
///
/// Deviation from websockify: dotfiles in a directory are skipped, because
/// editors and atomic writers leave `.name.swp` / `.tmpXXXX` files there that
/// would otherwise be parsed as token files mid-edit.
fn snapshot(source: &Path) -> Result<Vec<Stamp>, TokenError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TokenError::Io { path, source }
    };
    let meta = fs::metadata(source).map_err(io_err(source))?;
    if meta.is_file() {
        return Ok(vec![stamp(source, &meta)]);
    }
    if !meta.is_dir() {
        return Err(TokenError::Io {
            path: source.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a directory",
            ),
        });
    }
    let mut stamps = Vec::new();
    for entry in fs::read_dir(source).map_err(io_err(source))? {
        let entry = entry.map_err(io_err(source))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => stamps.push(stamp(&path, &m)),
            // Subdirectories, sockets and such are not token files.
            Ok(_) => {}
            // Removed between listing and stat, or a dangling symlink: it is
            // not part of the source right now.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    stamps.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(stamps)
}

fn stamp(path: &Path, meta: &fs::Metadata) -> Stamp {
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let inode = 0;
    Stamp {
        path: path.to_path_buf(),
        modified: meta.modified().ok(),
        len: meta.len(),
        inode,
    }
}

/// Read at most `max_bytes` of a file; more is an error. The limit is
/// enforced on the bytes read, not on the stat'ed size, so a file growing
/// under us cannot exceed it.
fn read_bounded(path: &Path, max_bytes: u64) -> Result<Vec<u8>, TokenError> {
    let io_err = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(io_err)?;
    let mut bytes = Vec::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > max_bytes {
        return Err(TokenError::TooLarge {
            path: path.to_path_buf(),
            max_bytes,
        });
    }
    Ok(bytes)
}

/// Parse one file's lines into `map`. Later definitions of a token replace
/// earlier ones, as in websockify's dict. `path` only names the file in
/// errors and logs; `strict` turns a bad line into an error instead of a
/// skipped line. Public for the fuzz target (`fuzz/`), which cannot go
/// through the file-reading [`TokenFile::load`] at fuzzing speed.
pub fn parse_into(
    path: &Path,
    bytes: &[u8],
    strict: bool,
    max_tokens: usize,
    map: &mut HashMap<String, TokenTarget>,
) -> Result<(), TokenError> {
    // Files saved by Windows editors may start with a UTF-8 BOM.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = index + 1;
        let parsed = std::str::from_utf8(raw)
            .map_err(|_| "line is not valid UTF-8".to_owned())
            .and_then(|line| {
                // trim() also drops the '\r' of CRLF files.
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    Ok(None)
                } else {
                    parse_line(line).map(Some)
                }
            });
        let (token, target) = match parsed {
            Ok(Some(entry)) => entry,
            Ok(None) => continue,
            Err(message) if strict => {
                return Err(TokenError::Parse {
                    path: path.to_path_buf(),
                    line: line_no,
                    message,
                })
            }
            Err(message) => {
                tracing::warn!(
                    file = %path.display(),
                    line = line_no,
                    error = %message,
                    "skipping bad token line"
                );
                continue;
            }
        };
        if !map.contains_key(&token) && map.len() >= max_tokens {
            return Err(TokenError::TooMany { max: max_tokens });
        }
        if let Some(old) = map.insert(token, target) {
            tracing::warn!(
                file = %path.display(),
                line = line_no,
                replaced = %old,
                "token defined more than once; the later definition wins"
            );
        }
    }
    Ok(())
}

/// Parse `token: host:port`.
///
/// websockify splits on the first colon followed by whitespace (`:\s`), so
/// a token may itself contain a colon; we do the same, and fall back to the
/// first colon for the whitespace-less `token:host:port`.
fn parse_line(line: &str) -> Result<(String, TokenTarget), String> {
    let sep = line
        .char_indices()
        .find(|&(i, c)| {
            c == ':'
                && line[i + 1..]
                    .chars()
                    .next()
                    .is_some_and(char::is_whitespace)
        })
        .map(|(i, _)| i)
        .or_else(|| line.find(':'))
        .ok_or_else(|| "expected `token: host:port`".to_owned())?;
    let token = line[..sep].trim();
    if token.is_empty() {
        return Err("empty token".to_owned());
    }
    let target = parse_target(line[sep + 1..].trim())?;
    Ok((token.to_owned(), target))
}

/// Parse `host:port`, `[v6]:port` or websockify's unbracketed `v6:port`.
fn parse_target(t: &str) -> Result<TokenTarget, String> {
    if t.starts_with("unix_socket:") {
        return Err("unix_socket targets are not supported".to_owned());
    }
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in target `{t}`"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| format!("expected `:port` after `[{host}]`"))?;
        (host, port)
    } else {
        t.rsplit_once(':')
            .ok_or_else(|| format!("target `{t}` has no `:port`"))?
    };
    if host.is_empty() {
        return Err(format!("target `{t}` has an empty host"));
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || c == '[' || c == ']')
    {
        return Err(format!("invalid host in target `{t}`"));
    }
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok(TokenTarget {
            host: host.to_owned(),
            port,
        }),
        _ => Err(format!("invalid port `{port}` in target `{t}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    const INTERVAL_MS: u64 = 1000;

    fn target(host: &str, port: u16) -> Option<TokenTarget> {
        Some(TokenTarget {
            host: host.into(),
            port,
        })
    }

    fn write(path: &Path, text: &str) {
        let mut f = File::create(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    /// Rewrite a file and move its mtime forward, so change detection does
    /// not depend on the filesystem's timestamp granularity or a sleep.
    fn rewrite(path: &Path, text: &str, bump_secs: u64) {
        write(path, text);
        let f = File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(bump_secs))
            .unwrap();
    }

    fn load(path: &Path) -> Result<TokenFile, TokenError> {
        TokenFile::load(path, INTERVAL_MS, 100, 4096)
    }

    #[test]
    fn parses_websockify_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        write(
            &p,
            "\u{feff}# header comment\n\
             \n\
             vm1: 10.0.0.1:5901\n\
             vm2 :host.example:5900\r\n\
             \t  vm3:\t[::1]:5902  \n\
             vm4: fd00::7:5903\n\
             a:b: h:1\n\
             plain:h:2\n\
             # trailing comment",
        );
        let mut tf = load(&p).unwrap();
        let now = Instant::now();
        assert_eq!(tf.len(), 6);
        assert_eq!(tf.lookup("vm1", now), target("10.0.0.1", 5901));
        assert_eq!(tf.lookup("vm2", now), target("host.example", 5900));
        assert_eq!(tf.lookup("vm3", now), target("::1", 5902));
        assert_eq!(tf.lookup("vm4", now), target("fd00::7", 5903));
        assert_eq!(tf.lookup("a:b", now), target("h", 1));
        assert_eq!(tf.lookup("plain", now), target("h", 2));
        assert_eq!(tf.lookup("missing", now), None);
        assert_eq!(tf.lookup("# header comment", now), None);
    }

    #[test]
    fn display_brackets_ipv6() {
        assert_eq!(target("::1", 5900).unwrap().to_string(), "[::1]:5900");
        assert_eq!(target("h", 1).unwrap().to_string(), "h:1");
    }

    #[test]
    fn bad_lines_fail_load_with_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        for bad in [
            "nocolon",
            ": h:1",
            "t: h",
            "t: h:0",
            "t: h:65536",
            "t: h:port",
            "t: :5900",
            "t: [::1:5900",
            "t: [::1]5900",
            "t: unix_socket:/tmp/vnc",
            "t: two words:1",
        ] {
            write(&p, &format!("ok: h:1\n{bad}\n"));
            match load(&p) {
                Err(TokenError::Parse { path, line, .. }) => {
                    assert_eq!((path.as_path(), line), (p.as_path(), 2), "{bad}")
                }
                other => panic!("{bad}: expected a parse error, got {other:?}"),
            }
        }
        std::fs::write(&p, b"ok: h:1\nt: h\xff:1\n").unwrap();
        let e = load(&p).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn missing_source_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(e, TokenError::Io { .. }));
        assert!(e.to_string().contains("nope"));
    }

    #[test]
    fn directory_source() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a"), "vm1: h1:1\ndup: a:1\n");
        write(&dir.path().join("b.conf"), "vm2: h2:2\ndup: b:2\n");
        write(&dir.path().join(".b.conf.swp"), "garbage\n");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        write(&dir.path().join("sub").join("c"), "vm3: h3:3\n");
        let mut tf = load(dir.path()).unwrap();
        let now = Instant::now();
        assert_eq!(tf.len(), 3);
        assert_eq!(tf.lookup("vm1", now), target("h1", 1));
        assert_eq!(tf.lookup("vm2", now), target("h2", 2));
        assert_eq!(tf.lookup("vm3", now), None);
        // Files are read in name order; the last definition wins.
        assert_eq!(tf.lookup("dup", now), target("b", 2));

        // Adding a file is noticed after the interval.
        write(&dir.path().join("c"), "vm4: h4:4\n");
        let later = now + Duration::from_millis(INTERVAL_MS);
        assert_eq!(tf.lookup("vm4", later), target("h4", 4));
        // Removing one too.
        std::fs::remove_file(dir.path().join("a")).unwrap();
        let later = later + Duration::from_millis(INTERVAL_MS);
        assert_eq!(tf.lookup("vm1", later), None);
        assert_eq!(tf.len(), 3);
    }

    #[test]
    fn empty_source_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let mut tf = load(dir.path()).unwrap();
        assert!(tf.is_empty());
        assert_eq!(tf.lookup("x", Instant::now()), None);
    }

    #[test]
    fn reload_waits_for_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        write(&p, "vm: old:1\n");
        let mut tf = load(&p).unwrap();
        let t0 = Instant::now();
        assert_eq!(tf.lookup("vm", t0), target("old", 1));

        rewrite(&p, "vm: new:2\n", 10);
        // Within the interval: no stat, old answer.
        let t1 = t0 + Duration::from_millis(INTERVAL_MS - 1);
        assert_eq!(tf.lookup("vm", t1), target("old", 1));
        // Past it: re-read.
        let t2 = t0 + Duration::from_millis(INTERVAL_MS);
        assert_eq!(tf.lookup("vm", t2), target("new", 2));
        // A `now` earlier than the last check (caller clock skew between
        // threads) must not panic or reload.
        assert_eq!(tf.lookup("vm", t0), target("new", 2));
    }

    #[test]
    fn zero_interval_checks_every_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        write(&p, "vm: old:1\n");
        let mut tf = TokenFile::load(&p, 0, 10, 1024).unwrap();
        let now = Instant::now();
        assert_eq!(tf.lookup("vm", now), target("old", 1));
        rewrite(&p, "vm: newer:2\n", 10);
        assert_eq!(tf.lookup("vm", now), target("newer", 2));
    }

    #[test]
    fn reload_errors_keep_the_old_table() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        write(&p, "vm: old:1\n");
        let mut tf = TokenFile::load(&p, INTERVAL_MS, 2, 64).unwrap();
        let mut now = Instant::now();
        let mut tick = || {
            now += Duration::from_millis(INTERVAL_MS);
            now
        };

        // Source deleted.
        std::fs::remove_file(&p).unwrap();
        assert_eq!(tf.lookup("vm", tick()), target("old", 1));
        assert!(tf.last_error.is_some());
        assert_eq!(tf.lookup("vm", tick()), target("old", 1));

        // Source too large.
        rewrite(&p, &format!("vm: new:2\n#{}\n", "x".repeat(100)), 10);
        assert_eq!(tf.lookup("vm", tick()), target("old", 1));

        // Too many tokens.
        rewrite(&p, "a: h:1\nb: h:2\nc: h:3\n", 20);
        assert_eq!(tf.lookup("vm", tick()), target("old", 1));
        assert_eq!(tf.len(), 1);

        // Once the source is valid again it is picked up.
        rewrite(&p, "vm: new:2\n", 30);
        assert_eq!(tf.lookup("vm", tick()), target("new", 2));
        assert!(tf.last_error.is_none());
    }

    #[test]
    fn reload_skips_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        write(&p, "vm: old:1\n");
        let mut tf = load(&p).unwrap();
        rewrite(&p, "broken line\nvm: new:2\nother: h:0\nok: h:3\n", 10);
        let later = Instant::now() + Duration::from_millis(INTERVAL_MS);
        assert_eq!(tf.lookup("vm", later), target("new", 2));
        assert_eq!(tf.lookup("ok", later), target("h", 3));
        assert_eq!(tf.len(), 2);
    }

    #[test]
    fn limits_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        write(&p, "a: h:1\nb: h:2\na: h:3\n");
        // Redefinition does not count twice.
        assert_eq!(TokenFile::load(&p, 0, 2, 1024).unwrap().len(), 2);
        assert!(matches!(
            TokenFile::load(&p, 0, 1, 1024),
            Err(TokenError::TooMany { max: 1 })
        ));
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(TokenFile::load(&p, 0, 10, len).is_ok());
        assert!(matches!(
            TokenFile::load(&p, 0, 10, len - 1),
            Err(TokenError::TooLarge { .. })
        ));
        // Across files of a directory.
        write(&dir.path().join("more"), "c: h:1\n");
        assert!(matches!(
            TokenFile::load(dir.path(), 0, 2, 1024),
            Err(TokenError::TooMany { max: 2 })
        ));
    }

    #[test]
    fn the_loader_resolves_names_off_the_workers_and_follows_edits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        write(&path, "a: localhost:5901\nb: 10.0.0.7:5902\n");
        let file = TokenFile::load(&path, 0, 100, 1 << 20).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let shared =
            spawn_loader(file, move || s2.load(std::sync::atomic::Ordering::SeqCst)).unwrap();
        let table = shared.load();
        let a = table.get("a").unwrap().as_ref().unwrap();
        assert!(a.ip().is_loopback() && a.port() == 5901, "{a}");
        assert_eq!(
            table.get("b").unwrap().as_ref().unwrap(),
            &"10.0.0.7:5902".parse().unwrap()
        );
        assert!(table.get("c").is_none());
        rewrite(&path, "c: 127.0.0.1:5903\n", 5);
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.load().get("c").is_none() {
            assert!(
                Instant::now() < deadline,
                "the loader never published the edit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(shared.load().get("a").is_none());
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_file_contents_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            strict in proptest::prelude::any::<bool>(),
        ) {
            let mut map = HashMap::new();
            let _ = parse_into(Path::new("t"), &bytes, strict, 8, &mut map);
            proptest::prop_assert!(map.len() <= 8);
            proptest::prop_assert!(map.values().all(|t| t.port != 0 && !t.host.is_empty()));
        }

        #[test]
        fn arbitrary_lines_never_panic(line in "\\PC{0,60}") {
            let _ = parse_line(&line);
        }
    }
}
