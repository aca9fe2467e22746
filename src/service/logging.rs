//! Log output: to journald with structured fields when systemd connected
//! stderr to the journal (`$JOURNAL_STREAM` names stderr), else text or
//! JSON lines on stderr. The level filter can be replaced at run time (a
//! reload); `RUST_LOG`, when set, wins over the config both at start and on
//! reload.
//!
//! Journal fields: every field of an event becomes `CG_<NAME>` (for
//! example `CG_SESSION`, `CG_USER`, `CG_VM`, `CG_REASON`, `CG_CODE`), next to
//! the standard `MESSAGE`, `PRIORITY`, `TARGET`, `CODE_FILE` and `CODE_LINE`;
//! `journalctl -u consolegate CG_SESSION=…` follows one session. The prefix
//! keeps an event field such as `priority` from overriding the journal's
//! own.

use std::io::IsTerminal as _;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Layer as _, Registry};

/// Prefix of the journal fields made from event fields.
pub const JOURNAL_FIELD_PREFIX: &str = "CG";

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    Journald,
    Text,
    Json,
}

/// The installed logger's knobs.
#[derive(Debug, Clone)]
pub struct LogControl {
    filter: Option<reload::Handle<EnvFilter, Registry>>,
    /// `RUST_LOG` was set: the config's level is not used.
    env_override: bool,
    pub sink: LogSink,
}

impl LogControl {
    /// Use `level` (a level or an `EnvFilter` string, validated by the
    /// config) from now on; nothing when `RUST_LOG` decides.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if self.env_override {
            return Ok(());
        }
        let Some(handle) = &self.filter else {
            return Ok(());
        };
        let filter = EnvFilter::builder()
            .parse(level)
            .map_err(|e| format!("log.level {level:?}: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    }
}

/// Whether stderr is the journal stream systemd set up
/// (`$JOURNAL_STREAM` = `device:inode` of stderr).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(st) => names_stream(value.to_str().unwrap_or(""), st.st_dev, st.st_ino),
        Err(_) => false,
    }
}

/// `$JOURNAL_STREAM`'s `device:inode` names the file with `dev` and `ino`.
fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// Install the global logger. `json` picks JSON lines over text when not
/// logging to journald; `default_filter` applies unless `RUST_LOG` is set.
/// A second call (tests) leaves the first logger in place.
pub fn init(json: bool, default_filter: &str) -> LogControl {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_override = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(default_filter));
    let (filter_layer, handle) = reload::Layer::new(filter);
    let journald = if stderr_is_journal() {
        tracing_journald::layer()
            .ok()
            .map(|l| l.with_field_prefix(Some(JOURNAL_FIELD_PREFIX.into())))
    } else {
        None
    };
    let sink = match (&journald, json) {
        (Some(_), _) => LogSink::Journald,
        (None, true) => LogSink::Json,
        (None, false) => LogSink::Text,
    };
    // Colour codes only for a person at a terminal, not for files.
    let ansi = std::io::stderr().is_terminal();
    let output = match (journald, sink) {
        (Some(j), _) => j.boxed(),
        (None, LogSink::Json) => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        (None, _) => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter_layer)
        .with(output)
        .try_init()
        .is_ok();
    LogControl {
        filter: installed.then_some(handle),
        env_override,
        sink,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_stream_is_matched_by_device_and_inode() {
        assert!(names_stream("8:12345", 8, 12345));
        assert!(!names_stream("8:12345", 8, 12346));
        assert!(!names_stream("9:12345", 8, 12345));
        assert!(!names_stream("garbage", 8, 12345));
        assert!(!names_stream("", 0, 0));
    }

    #[test]
    fn a_bad_level_is_refused_when_reloading() {
        let (_layer, handle) = reload::Layer::<EnvFilter, Registry>::new(EnvFilter::new("info"));
        let c = LogControl {
            filter: Some(handle),
            env_override: false,
            sink: LogSink::Text,
        };
        c.set_level("debug,consolegate=trace").unwrap();
        assert!(c.set_level("info,[").unwrap_err().contains("log.level"));
    }
}
