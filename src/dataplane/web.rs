//! Static files for `--web DIR`: serves e.g. noVNC's `vnc.html` on the
//! proxy's own port, as websockify does, so one URL gives both the viewer and
//! its WebSocket.
//!
//! Given a raw request path, [`WebRoot::respond`] builds a complete HTTP/1.1
//! response (always `Connection: close`). It serves only regular files that
//! resolve, after every symlink, to a path under the canonical root; it never
//! lists directories and never serves dotfiles (a noVNC checkout carries
//! `.git/`).
//!
//! [`WebRoot::open`] answers with the response head and, for a file, a
//! [`WebBody`] that the session streams chunk by chunk as the browser
//! takes it: a response never holds more than the session's `buffer_bytes`
//! of a file in memory, however large the file and however slow (or
//! absent) its reader. The reads are blocking and happen on the calling
//! worker thread. That is accepted because the files are few and small
//! (noVNC's largest is a few hundred KiB), stay in the page cache, and are
//! fetched once per viewer page load, never per frame; each read is at most
//! one chunk. `max_file_bytes` bounds what one response may send; a file
//! that grows or shrinks after its `stat` is cut at (or ends the connection
//! short of) the length announced.
//!
//! Depends only on `protocol::http_upgrade` (for the project's JSON error
//! body); no IO backend, no session.

use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// Why a static-file request failed. `Root` is the operator's side; the
/// others answer a browser request.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The request path is unusable: not origin-form, a bad `%` escape, a
    /// NUL byte or not UTF-8 once decoded.
    #[error("bad request path: {0}")]
    BadRequest(&'static str),
    /// No such file, a dotfile, a directory without `index.html`, or not a
    /// regular file.
    #[error("not found")]
    NotFound,
    /// A `..` segment, a symlink leading outside the root, or a permission
    /// error.
    #[error("forbidden")]
    Forbidden,
    /// The file exceeds `max_file_bytes`.
    #[error("file larger than the configured limit of {max_bytes} bytes")]
    TooLarge {
        /// The configured `max_file_bytes`.
        max_bytes: u64,
    },
    /// Any other IO failure while serving.
    #[error("io error: {0}")]
    Io(#[from] io::Error),
    /// The configured web root cannot be used (start-up only).
    #[error("web root {}: {source}", path.display())]
    Root {
        /// The configured root.
        path: PathBuf,
        /// Why it cannot be used.
        #[source]
        source: io::Error,
    },
}

impl WebError {
    /// HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            WebError::BadRequest(_) => 400,
            WebError::NotFound => 404,
            WebError::Forbidden => 403,
            // The client asked for nothing wrong; the operator's limit is
            // what refused it.
            WebError::TooLarge { .. } => 500,
            WebError::Io(_) | WebError::Root { .. } => 500,
        }
    }

    /// Stable snake_case name, for metric labels and the JSON error `code`.
    pub fn kind(&self) -> &'static str {
        match self {
            WebError::BadRequest(_) => "bad_request",
            WebError::NotFound => "not_found",
            WebError::Forbidden => "forbidden",
            WebError::TooLarge { .. } => "file_too_large",
            WebError::Io(_) => "io",
            WebError::Root { .. } => "web_root",
        }
    }

    /// Message for the response body: says what went wrong without naming
    /// any filesystem path or OS error text.
    fn public_message(&self) -> &'static str {
        match self {
            WebError::BadRequest(m) => m,
            WebError::NotFound => "not found",
            WebError::Forbidden => "forbidden",
            WebError::TooLarge { .. } => "file exceeds the server's size limit",
            WebError::Io(_) | WebError::Root { .. } => "internal error",
        }
    }
}

/// The directory served by `--web`.
#[derive(Debug, Clone)]
pub struct WebRoot {
    /// Canonical (absolute, symlink-free) root; every served file's
    /// canonical path must start with it.
    root: PathBuf,
    /// Largest file served, in bytes.
    max_file_bytes: u64,
}

impl WebRoot {
    /// Check and canonicalize `root`, which must be a readable directory.
    /// `max_file_bytes` bounds the memory and blocking read of one response.
    pub fn new(root: &Path, max_file_bytes: u64) -> Result<Self, WebError> {
        let root_err = |source| WebError::Root {
            path: root.to_path_buf(),
            source,
        };
        let canonical = fs::canonicalize(root).map_err(root_err)?;
        if !fs::metadata(&canonical).map_err(root_err)?.is_dir() {
            return Err(root_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a directory",
            )));
        }
        Ok(WebRoot {
            root: canonical,
            max_file_bytes,
        })
    }

    /// The response to a GET (or, with `head`, HEAD) of the raw request
    /// path (percent-encoded; a query or fragment is ignored): the status
    /// line and headers, plus for a GET of a file the body to stream.
    /// Errors become a complete JSON error response; HEAD responses carry
    /// headers only, with the Content-Length the GET would have.
    pub fn open(&self, path: &str, head: bool) -> (Vec<u8>, Option<WebBody>) {
        match self.serve(path, head) {
            Ok((file, len, body)) => (response_head(200, content_type(&file), len), body),
            Err(e) => {
                match &e {
                    // The operator must act on these.
                    WebError::Io(_) | WebError::TooLarge { .. } | WebError::Root { .. } => {
                        tracing::warn!(path = ?path, error = %e, "static file not served")
                    }
                    _ => tracing::debug!(path = ?path, error = %e, "static file not served"),
                }
                (error_response(&e, head), None)
            }
        }
    }

    /// The whole response in one buffer (tests).
    #[cfg(test)]
    pub fn respond(&self, path: &str, head: bool) -> Vec<u8> {
        let (mut out, body) = self.open(path, head);
        if let Some(mut body) = body {
            let mut buf = vec![0u8; 4096];
            loop {
                match body.read_chunk(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("body read: {e}"),
                }
            }
        }
        out
    }

    /// Resolve and open; returns the served file, its length and, for a
    /// GET, the body to stream.
    fn serve(&self, raw: &str, head: bool) -> Result<(PathBuf, u64, Option<WebBody>), WebError> {
        let (file, meta) = self.resolve(raw)?;
        if meta.len() > self.max_file_bytes {
            return Err(WebError::TooLarge {
                max_bytes: self.max_file_bytes,
            });
        }
        if head {
            return Ok((file, meta.len(), None));
        }
        let f = fs::File::open(&file).map_err(map_io)?;
        let body = WebBody {
            file: f,
            remaining: meta.len(),
        };
        Ok((file, meta.len(), Some(body)))
    }

    /// Map a raw request path to a regular file under the root.
    fn resolve(&self, raw: &str) -> Result<(PathBuf, fs::Metadata), WebError> {
        let raw = raw.split(['?', '#']).next().unwrap_or(raw);
        if !raw.starts_with('/') {
            return Err(WebError::BadRequest("path must start with '/'"));
        }
        let decoded = percent_decode(raw)?;
        if decoded.contains(&0) {
            return Err(WebError::BadRequest("NUL byte in path"));
        }
        let decoded =
            String::from_utf8(decoded).map_err(|_| WebError::BadRequest("path is not UTF-8"))?;

        // Build the candidate one plain segment at a time: pushing a decoded
        // "/etc/passwd" as a whole would replace the root (Path::push of an
        // absolute path), and ".." is refused before the filesystem sees it.
        let mut candidate = self.root.clone();
        for segment in decoded.split('/') {
            match segment {
                "" | "." => {}
                ".." => return Err(WebError::Forbidden),
                s if s.starts_with('.') => return Err(WebError::NotFound),
                s => candidate.push(s),
            }
        }

        let file = self.contain(&candidate)?;
        let meta = fs::metadata(&file).map_err(map_io)?;
        let (file, meta) = if meta.is_dir() {
            // index.html may itself be a symlink: contain it again.
            let index = self.contain(&file.join("index.html"))?;
            let meta = fs::metadata(&index).map_err(map_io)?;
            (index, meta)
        } else {
            (file, meta)
        };
        // FIFOs, sockets and devices are never content (opening a FIFO
        // would block the worker), nor is a directory named index.html.
        if !meta.is_file() {
            return Err(WebError::NotFound);
        }
        Ok((file, meta))
    }

    /// Canonicalize `candidate` (resolving every symlink) and check that it
    /// is still under the root and not inside a hidden component.
    fn contain(&self, candidate: &Path) -> Result<PathBuf, WebError> {
        let canonical = fs::canonicalize(candidate).map_err(map_io)?;
        let Ok(relative) = canonical.strip_prefix(&self.root) else {
            tracing::info!(
                path = ?candidate.display().to_string(),
                "static file request resolves outside the web root"
            );
            return Err(WebError::Forbidden);
        };
        // A symlink inside the root may point at a dotfile (e.g. `.git`).
        let hidden = relative
            .components()
            .any(|c| matches!(c, Component::Normal(n) if n.to_string_lossy().starts_with('.')));
        if hidden {
            return Err(WebError::NotFound);
        }
        Ok(canonical)
    }
}

/// A file's bytes still to send, read one chunk at a time as the browser
/// takes them.
#[derive(Debug)]
pub struct WebBody {
    file: fs::File,
    /// Bytes of the announced Content-Length not yet read.
    remaining: u64,
}

impl WebBody {
    /// Bytes still to send.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Read the next chunk into `buf`; `Ok(0)` once the announced length is
    /// all read. A file that shrank since its `stat` is an error (the
    /// response cannot be completed), one that grew is cut at the length
    /// announced.
    pub fn read_chunk(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while it was being served",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Missing paths (including "a file used as a directory") are 404 and
/// permission problems 403; anything else is an internal error.
fn map_io(e: io::Error) -> WebError {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => WebError::NotFound,
        io::ErrorKind::PermissionDenied => WebError::Forbidden,
        _ => WebError::Io(e),
    }
}

/// Strict percent-decoding of a path: a `%` not followed by two hex digits
/// is an error. `+` stays `+` (form encoding applies to queries only).
fn percent_decode(s: &str) -> Result<Vec<u8>, WebError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_val);
            let lo = bytes.get(i + 2).copied().and_then(hex_val);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(WebError::BadRequest("bad percent escape in path"));
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Content-Type by extension. Unknown types are served as an opaque
/// download; together with `nosniff` a browser will not run them.
fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        // RFC 9239: text/javascript is the one media type for JS and modules.
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "txt" => "text/plain; charset=utf-8",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// Status line and headers, up to and including the blank line.
fn response_head(status: u16, content_type: &str, content_length: u64) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\n\
         Content-Type: {content_type}\r\n\
         Content-Length: {content_length}\r\n\
         Cache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Connection: close\r\n\r\n"
    )
    .into_bytes()
}

/// The project's JSON error body. HEAD gets the same headers and no body.
fn error_response(e: &WebError, head: bool) -> Vec<u8> {
    let body = crate::protocol::http_upgrade::error_body(e.kind(), e.public_message());
    let mut out = response_head(e.status(), "application/json", body.len() as u64);
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    const MAX: u64 = 1024;

    struct Fixture {
        // Held so the directories outlive the test.
        _dir: TempDir,
        root: PathBuf,
        outside: PathBuf,
        web: WebRoot,
    }

    /// root/ with index.html, app.js, sub/ (no index), docs/index.html,
    /// big.bin, .git/config; a sibling outside/secret.txt.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::create_dir_all(root.join("docs")).unwrap();
        fs::create_dir_all(root.join(".git")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(root.join("index.html"), "<h1>home</h1>").unwrap();
        fs::write(root.join("app.js"), "let x = 1;").unwrap();
        fs::write(root.join("sub").join("a b.css"), "body{}").unwrap();
        fs::write(root.join("docs").join("index.html"), "docs").unwrap();
        fs::write(root.join("big.bin"), vec![0u8; MAX as usize + 1]).unwrap();
        fs::write(root.join("exact.bin"), vec![7u8; MAX as usize]).unwrap();
        fs::write(root.join(".git").join("config"), "secret").unwrap();
        fs::write(outside.join("secret.txt"), "TOPSECRET").unwrap();
        let web = WebRoot::new(&root, MAX).unwrap();
        Fixture {
            _dir: dir,
            root,
            outside,
            web,
        }
    }

    /// (status, headers, body)
    fn split(resp: &[u8]) -> (u16, String, Vec<u8>) {
        let pos = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(resp[..pos].to_vec()).unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head, resp[pos + 4..].to_vec())
    }

    fn get(f: &Fixture, path: &str) -> (u16, String, Vec<u8>) {
        split(&f.web.respond(path, false))
    }

    #[test]
    fn serves_a_file() {
        let f = fixture();
        let (status, head, body) = get(&f, "/app.js?v=2");
        assert_eq!(status, 200);
        assert_eq!(body, b"let x = 1;");
        for h in [
            "HTTP/1.1 200 OK",
            "\r\nContent-Type: text/javascript; charset=utf-8",
            "\r\nContent-Length: 10",
            "\r\nCache-Control: no-cache",
            "\r\nX-Content-Type-Options: nosniff",
            "\r\nConnection: close",
        ] {
            assert!(head.contains(h), "{h} missing from {head}");
        }
        let (status, head, body) = get(&f, "/sub/a%20b.css");
        assert_eq!((status, body.as_slice()), (200, b"body{}".as_slice()));
        assert!(head.contains("text/css"));
        // Redundant slashes and dots collapse.
        assert_eq!(get(&f, "//sub/./a%20b.css").0, 200);
    }

    #[test]
    fn index_html_for_directories() {
        let f = fixture();
        let (status, head, body) = get(&f, "/");
        assert_eq!(
            (status, body.as_slice()),
            (200, b"<h1>home</h1>".as_slice())
        );
        assert!(head.contains("text/html"));
        assert_eq!(get(&f, "/docs/").2, b"docs");
        assert_eq!(get(&f, "/docs").2, b"docs");
        // No listing for a directory without index.html.
        assert_eq!(get(&f, "/sub/").0, 404);
    }

    #[test]
    fn not_found() {
        let f = fixture();
        let (status, head, body) = get(&f, "/nope.html");
        assert_eq!(status, 404);
        assert!(head.contains("Content-Type: application/json"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(
            body,
            br#"{"error":{"code":"not_found","message":"not found"}}"#
        );
        // A file used as a directory.
        assert_eq!(get(&f, "/app.js/x").0, 404);
        // Dotfiles are never served, directly or encoded.
        assert_eq!(get(&f, "/.git/config").0, 404);
        assert_eq!(get(&f, "/%2egit/config").0, 404);
    }

    #[test]
    fn traversal_attempts() {
        let f = fixture();
        for (path, status) in [
            ("/../outside/secret.txt", 403),
            ("/%2e%2e/outside/secret.txt", 403),
            ("/%2E%2E%2Foutside%2Fsecret.txt", 403),
            ("/..%2foutside/secret.txt", 403),
            ("/sub/../../outside/secret.txt", 403),
            ("/..", 403),
            ("%2e%2e/outside/secret.txt", 400),
            ("../outside/secret.txt", 400),
            ("outside/secret.txt", 400),
            ("", 400),
            ("/index.html%00.png", 400),
            ("/%00", 400),
            ("/%zz", 400),
            ("/%e9", 400),
        ] {
            let (s, _, body) = get(&f, path);
            assert_eq!(s, status, "{path}");
            assert!(!String::from_utf8_lossy(&body).contains("TOPSECRET"));
        }
        // Absolute paths stay under the root: they are simply not found.
        let abs = f.outside.join("secret.txt");
        let abs = abs.to_str().unwrap();
        assert_eq!(get(&f, abs).0, 404);
        assert_eq!(get(&f, &format!("/{abs}")).0, 404);
        assert_eq!(get(&f, &abs.replace('/', "%2F")).0, 400);
        assert_eq!(get(&f, &format!("/{}", abs.replace('/', "%2F"))).0, 404);
        // Backslashes are ordinary file-name bytes on Unix.
        assert_eq!(get(&f, "/..\\outside\\secret.txt").0, 404);
    }

    #[cfg(unix)]
    #[test]
    fn symlinks() {
        use std::os::unix::fs::symlink;
        let f = fixture();
        symlink(f.outside.join("secret.txt"), f.root.join("leak.txt")).unwrap();
        symlink(&f.outside, f.root.join("outdir")).unwrap();
        symlink(f.root.join("app.js"), f.root.join("alias.js")).unwrap();
        symlink(f.root.join(".git"), f.root.join("git")).unwrap();
        fs::create_dir(f.root.join("evil")).unwrap();
        symlink(
            f.outside.join("secret.txt"),
            f.root.join("evil").join("index.html"),
        )
        .unwrap();

        assert_eq!(get(&f, "/leak.txt").0, 403);
        assert_eq!(get(&f, "/outdir/secret.txt").0, 403);
        assert_eq!(get(&f, "/evil/").0, 403);
        assert_eq!(get(&f, "/git/config").0, 404);
        let (status, _, body) = get(&f, "/alias.js");
        assert_eq!((status, body.as_slice()), (200, b"let x = 1;".as_slice()));
        // A dangling link is simply not found.
        symlink(f.root.join("gone"), f.root.join("dangling")).unwrap();
        assert_eq!(get(&f, "/dangling").0, 404);
    }

    #[test]
    fn head_has_headers_only() {
        let f = fixture();
        let (status, head, body) = split(&f.web.respond("/app.js", true));
        assert_eq!(status, 200);
        assert!(head.contains("Content-Length: 10"));
        assert!(body.is_empty());
        let (status, head, body) = split(&f.web.respond("/missing", true));
        assert_eq!(status, 404);
        assert!(!head.contains("Content-Length: 0"));
        assert!(body.is_empty());
    }

    #[test]
    fn size_limit() {
        let f = fixture();
        let (status, _, body) = get(&f, "/exact.bin");
        assert_eq!((status, body.len() as u64), (200, MAX));
        let (status, _, body) = get(&f, "/big.bin");
        assert_eq!(status, 500);
        assert!(String::from_utf8_lossy(&body).contains("file_too_large"));
        assert_eq!(split(&f.web.respond("/big.bin", true)).0, 500);
    }

    #[test]
    fn content_types() {
        for (name, ct) in [
            ("a.HTML", "text/html; charset=utf-8"),
            ("a.mjs", "text/javascript; charset=utf-8"),
            ("a.json", "application/json"),
            ("a.js.map", "application/json"),
            ("a.svg", "image/svg+xml"),
            ("a.png", "image/png"),
            ("a.jpg", "image/jpeg"),
            ("favicon.ico", "image/x-icon"),
            ("a.wasm", "application/wasm"),
            ("a.txt", "text/plain; charset=utf-8"),
            ("a.woff", "font/woff"),
            ("a.woff2", "font/woff2"),
            ("Makefile", "application/octet-stream"),
            ("a.exe", "application/octet-stream"),
        ] {
            assert_eq!(content_type(Path::new(name)), ct, "{name}");
        }
    }

    #[test]
    fn bad_roots() {
        let dir = tempfile::tempdir().unwrap();
        let missing = WebRoot::new(&dir.path().join("missing"), MAX).unwrap_err();
        assert_eq!(missing.kind(), "web_root");
        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        assert!(matches!(
            WebRoot::new(&file, MAX),
            Err(WebError::Root { .. })
        ));
    }

    #[test]
    fn json_escaping() {
        let raw = "a\"b\\c\nd\u{1}é";
        let body = crate::protocol::http_upgrade::error_body("code", raw);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["message"], raw);
    }

    #[test]
    fn arbitrary_paths_never_escape() {
        use proptest::prelude::*;
        let f = fixture();
        let mut runner = proptest::test_runner::TestRunner::default();
        let strategy = "(/|%2[eEfF]|\\.|\\.\\.|outside|secret\\.txt|%00|%|[a-z]|\\PC){0,12}";
        runner
            .run(&strategy, |path| {
                let resp = f.web.respond(&path, false);
                prop_assert!(resp.starts_with(b"HTTP/1.1 "));
                prop_assert!(!String::from_utf8_lossy(&resp).contains("TOPSECRET"));
                Ok(())
            })
            .unwrap();
    }
}
