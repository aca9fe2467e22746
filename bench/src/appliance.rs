//! consolegate in appliance mode (`consolegate run --config FILE`) as a child
//! process of the bench: a TOML config written per instance into the output
//! directory (loopback listeners on port 0, a dedicated-port range probed free
//! above 20 000, a state directory beside the config unless the caller puts
//! it elsewhere, a random admin token, the demo console on, logging at
//! `warn`), the two ready lines it prints
//! (`control listening on …`, `listening on … (io=…, workers=…)`), and a
//! handle that stops it by PID (SIGTERM: drain with a 200 ms grace, then
//! SIGKILL after the child module's grace period).
//!
//! What it does not do: talk to the API (see `rest`) or measure anything.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::child::{self, ChildProc};

/// Dedicated ports probed per range.
pub const PORT_RANGE_WIDTH: u16 = 200;
/// Lowest dedicated port used.
pub const PORT_FLOOR: u16 = 20_000;
/// Candidate ranges tried before giving up.
const PORT_RANGE_ATTEMPTS: usize = 32;
/// Drain grace after SIGTERM (`[dataplane.limits] drain_grace_ms`).
pub const DRAIN_GRACE_MS: u64 = 200;

/// What goes into one instance's config file.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `epoll` or `uring`.
    pub io: &'static str,
    pub port_range: (u16, u16),
    pub state_dir: PathBuf,
    pub token: String,
    /// `[demo] max_clients`: more than the sessions ever open at once, so no
    /// sample meets the demo server's "too many clients" refusal.
    pub demo_max_clients: usize,
}

/// A TOML basic string (quotes, backslashes and control characters escaped).
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The config file of one instance.
pub fn render_toml(s: &Settings) -> String {
    format!(
        "# Written by consolegate-bench (session-start); one instance, loopback only.\n\
         [control]\nlisten = \"127.0.0.1:0\"\n\n\
         [console]\nlisten = \"127.0.0.1:0\"\n\n\
         [ports]\nrange = \"{}-{}\"\nstate_dir = {}\n\n\
         [[auth.tokens]]\ntoken = {}\nrole = \"admin\"\n\n\
         [dataplane]\nio = \"{}\"\n\n\
         [dataplane.limits]\ndrain_grace_ms = {DRAIN_GRACE_MS}\n\n\
         [demo]\nenabled = true\nmax_clients = {}\n\n\
         [log]\nlevel = \"warn\"\n\n\
         [sessions]\nmax_sessions_per_user = 100000\nmax_sessions = 100000\nbind_origin = false\n",
        s.port_range.0,
        s.port_range.1,
        toml_string(&s.state_dir.display().to_string()),
        toml_string(&s.token),
        s.io,
        s.demo_max_clients,
    )
}

/// Candidate ranges of `width` ports from `floor` up, clear of the kernel's
/// ephemeral range (where the bench's own outgoing connections take ports),
/// starting at a place chosen by `salt` so concurrent runs spread out.
pub fn port_range_candidates(
    floor: u16,
    width: u16,
    ephemeral: Option<(u16, u16)>,
    salt: u64,
) -> Vec<(u16, u16)> {
    if width == 0 {
        return Vec::new();
    }
    let mut all = Vec::new();
    let mut first = u32::from(floor);
    while first + u32::from(width) - 1 <= u32::from(u16::MAX) {
        let last = first + u32::from(width) - 1;
        let overlaps =
            ephemeral.is_some_and(|(lo, hi)| first <= u32::from(hi) && last >= u32::from(lo));
        if !overlaps {
            all.push((first as u16, last as u16));
        }
        first += u32::from(width);
    }
    if !all.is_empty() {
        let n = all.len();
        all.rotate_left((salt % n as u64) as usize);
    }
    all
}

/// `/proc/sys/net/ipv4/ip_local_port_range`.
fn ephemeral_range() -> Option<(u16, u16)> {
    let t = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = t.split_whitespace().map(|v| v.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

/// A range of [`PORT_RANGE_WIDTH`] ports on 127.0.0.1 that were all free a
/// moment ago (each bound and released). The appliance checks every port it
/// allocates against the OS anyway; this only keeps the pool from starting
/// out full of other programs' ports.
pub fn probe_port_range() -> Result<(u16, u16)> {
    let salt = u64::from(std::process::id()) ^ crate::common::unix_now();
    for (first, last) in
        port_range_candidates(PORT_FLOOR, PORT_RANGE_WIDTH, ephemeral_range(), salt)
            .into_iter()
            .take(PORT_RANGE_ATTEMPTS)
    {
        let all_free = (first..=last).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return Ok((first, last));
        }
    }
    bail!("no free range of {PORT_RANGE_WIDTH} ports above {PORT_FLOOR} on 127.0.0.1")
}

/// 48 hex characters of a random admin token (loopback only, thrown away
/// with the instance; it never appears in the reports).
pub fn random_token() -> String {
    let mut next = crate::client::mask_source(u64::from(std::process::id()));
    let mut s = String::with_capacity(48);
    for _ in 0..6 {
        for b in next() {
            let _ = write!(s, "{b:02x}");
        }
    }
    s
}

/// The ready lines seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadyLines {
    pub control: Option<SocketAddr>,
    pub console: Option<SocketAddr>,
    pub io: Option<String>,
    pub workers: Option<usize>,
}

impl ReadyLines {
    /// Takes one stdout line; true once both listeners are known.
    pub fn feed(&mut self, line: &str) -> bool {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("control listening on ") {
            if let Some(a) = rest.split_whitespace().next().and_then(|a| a.parse().ok()) {
                self.control = Some(a);
            }
        } else if l.starts_with("listening on ") {
            if let Some((addr, workers)) = crate::proxy::parse_listening_line(l) {
                self.console = Some(addr);
                self.workers = workers;
                self.io = l.find("io=").map(|i| {
                    l[i + 3..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect()
                });
            }
        }
        self.control.is_some() && self.console.is_some()
    }
}

pub struct RunningAppliance {
    pub control: SocketAddr,
    pub console: SocketAddr,
    pub workers: Option<usize>,
    pub token: String,
    pub config_path: PathBuf,
    pub port_range: (u16, u16),
    child: ChildProc,
}

impl RunningAppliance {
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    pub fn has_exited(&mut self) -> bool {
        self.child.has_exited()
    }

    pub fn log_tail(&self) -> String {
        child::log_tail(self.child.log_path(), 600)
    }

    pub fn log_path(&self) -> &Path {
        self.child.log_path()
    }

    /// SIGTERM (drain), SIGKILL if it lingers; waits until it is gone.
    pub fn stop(&mut self) {
        self.child.stop();
    }
}

/// Writes `dir/consolegate.toml` and starts `exe run --config` on it; the
/// log goes to `log`. The state directory (where dedicated-port allocations
/// are persisted, with fsync, on every change) is `state_dir`.
pub fn start(
    exe: &Path,
    dir: &Path,
    state_dir: &Path,
    io: &'static str,
    demo_max_clients: usize,
    log: &Path,
    startup_timeout: Duration,
) -> Result<RunningAppliance> {
    start_with(
        exe,
        dir,
        state_dir,
        io,
        demo_max_clients,
        log,
        startup_timeout,
        "",
    )
}

/// [`start`] with `extra_toml` (whole tables, e.g. `[auth.jwt]` or
/// `[events]`) appended to the config file.
#[allow(clippy::too_many_arguments)]
pub fn start_with(
    exe: &Path,
    dir: &Path,
    state_dir: &Path,
    io: &'static str,
    demo_max_clients: usize,
    log: &Path,
    startup_timeout: Duration,
    extra_toml: &str,
) -> Result<RunningAppliance> {
    child::require_file(exe, "build it: cargo build --release -p consolegate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let port_range = probe_port_range()?;
    let token = random_token();
    let settings = Settings {
        io,
        port_range,
        state_dir: std::path::absolute(state_dir)?,
        token: token.clone(),
        demo_max_clients,
    };
    let config_path = dir.join("consolegate.toml");
    std::fs::write(&config_path, render_toml(&settings) + extra_toml)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let args = vec![
        "run".to_string(),
        "--config".to_string(),
        config_path.display().to_string(),
    ];
    let mut c = ChildProc::spawn(&format!("consolegate-{io}-appliance"), exe, &args, log)?;
    let seen = RefCell::new(ReadyLines::default());
    let ready = c
        .wait_for_line(startup_timeout, |l| {
            let mut s = seen.borrow_mut();
            s.feed(l).then(|| s.clone())
        })
        .context("waiting for `control listening on` and `listening on`")?;
    if ready.io.as_deref().is_some_and(|got| got != io) {
        bail!(
            "asked for io={io}, the appliance runs io={}",
            ready.io.unwrap_or_default()
        );
    }
    Ok(RunningAppliance {
        control: ready.control.ok_or_else(|| anyhow!("no control address"))?,
        console: ready.console.ok_or_else(|| anyhow!("no console address"))?,
        workers: ready.workers,
        token,
        config_path,
        port_range,
        child: c,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_in_either_order() {
        let mut r = ReadyLines::default();
        assert!(!r.feed("control listening on 127.0.0.1:39913"));
        assert!(r.feed("listening on 127.0.0.1:44179 (io=epoll, workers=2)"));
        assert_eq!(r.control, Some("127.0.0.1:39913".parse().unwrap()));
        assert_eq!(r.console, Some("127.0.0.1:44179".parse().unwrap()));
        assert_eq!((r.io.as_deref(), r.workers), (Some("epoll"), Some(2)));
        let mut r = ReadyLines::default();
        assert!(!r.feed("listening on 127.0.0.1:2 (io=uring, workers=1)"));
        assert!(!r.feed("console public url ws://127.0.0.1:2"));
        assert!(!r.feed("admin token: x"));
        assert!(r.feed("control listening on 127.0.0.1:1\n"));
        assert_eq!(r.io.as_deref(), Some("uring"));
        // "control listening on" must not be taken for the console line.
        let mut r = ReadyLines::default();
        r.feed("control listening on 127.0.0.1:1");
        assert_eq!(r.console, None);
    }

    #[test]
    fn config_has_every_key_and_escapes_strings() {
        let s = Settings {
            io: "uring",
            port_range: (20_400, 20_599),
            state_dir: PathBuf::from("/tmp/a \"b\"\\c/state"),
            token: "0123456789abcdef0123456789abcdef".into(),
            demo_max_clients: 64,
        };
        let t = render_toml(&s);
        for want in [
            "[control]\nlisten = \"127.0.0.1:0\"",
            "[console]\nlisten = \"127.0.0.1:0\"",
            "range = \"20400-20599\"",
            "state_dir = \"/tmp/a \\\"b\\\"\\\\c/state\"",
            "[[auth.tokens]]\ntoken = \"0123456789abcdef0123456789abcdef\"\nrole = \"admin\"",
            "[dataplane]\nio = \"uring\"",
            "[dataplane.limits]\ndrain_grace_ms = 200",
            "[demo]\nenabled = true\nmax_clients = 64",
            "[log]\nlevel = \"warn\"",
            "max_sessions_per_user = 100000\nmax_sessions = 100000",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        assert_eq!(toml_string("a\nb\u{1}"), "\"a\\u000Ab\\u0001\"");
    }

    #[test]
    fn port_ranges_avoid_the_ephemeral_range() {
        let c = port_range_candidates(20_000, 200, Some((32_768, 60_999)), 0);
        assert_eq!(c[0], (20_000, 20_199));
        assert!(c
            .iter()
            .all(|&(a, b)| b - a == 199 && (b < 32_768 || a > 60_999)));
        // 20000..32767 holds 63 full ranges (the 64th would cross 32768),
        // 61000..65535 another 22.
        assert_eq!(c.len(), 63 + 22);
        assert!(c.contains(&(32_400, 32_599)) && !c.contains(&(32_600, 32_799)));
        let rotated = port_range_candidates(20_000, 200, Some((32_768, 60_999)), 1);
        assert_eq!(rotated[0], (20_200, 20_399));
        assert_eq!(*rotated.last().unwrap(), (20_000, 20_199));
        assert!(port_range_candidates(65_400, 200, None, 7).is_empty());
        assert_eq!(
            port_range_candidates(65_336, 200, None, 7),
            vec![(65_336, 65_535)]
        );
        assert!(port_range_candidates(20_000, 0, None, 0).is_empty());
        assert_eq!(random_token().len(), 48);
    }
}
