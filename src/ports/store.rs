//! `ports.json`: the allocations, persisted so a restart restores them.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::PortError;

/// File name of the state file inside the state directory.
pub const STATE_FILE_NAME: &str = "ports.json";

/// Largest state file read. A full range of 65535 ports serializes to about
/// 5 MiB, so anything larger is not ours; the cap bounds the memory a
/// damaged or hostile file can make us use.
pub const MAX_STATE_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// Bumped when the layout changes incompatibly; an unknown version is
/// refused rather than guessed at.
const FORMAT_VERSION: u32 = 1;

/// Distinguishes temp files of concurrent saves within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// One persisted claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub port: u16,
    /// Session id (never 0).
    pub owner: u64,
    /// Wall-clock time of the allocation, for operators ("held since").
    pub allocated_at_unix_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    allocations: Vec<Allocation>,
}

/// Reads and atomically writes `<state_dir>/ports.json`.
#[derive(Debug, Clone)]
pub struct PortStore {
    path: PathBuf,
}

impl PortStore {
    /// Touches nothing on disk; the directory is created by the first save.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(STATE_FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, reason: impl Into<String>) -> PortError {
        PortError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn io(&self, op: &'static str, path: &Path, source: io::Error) -> PortError {
        PortError::Io {
            op,
            target: path.display().to_string(),
            source,
        }
    }

    /// The persisted allocations; empty when there is no file yet. A file
    /// that is too large, not our JSON, of an unknown version, or lists port
    /// 0, owner 0 or a port twice is [`PortError::Corrupt`] and is left as
    /// it is for an operator to inspect.
    pub fn load(&self) -> Result<Vec<Allocation>, PortError> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("open", &self.path, e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_STATE_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.io("read", &self.path, e))?;
        if bytes.len() as u64 > MAX_STATE_FILE_BYTES {
            return Err(self.corrupt(format!(
                "larger than {MAX_STATE_FILE_BYTES} bytes (MAX_STATE_FILE_BYTES)"
            )));
        }
        let state: StateFile = serde_json::from_slice(&bytes)
            .map_err(|e| self.corrupt(format!("not valid port state JSON: {e}")))?;
        if state.version != FORMAT_VERSION {
            return Err(self.corrupt(format!(
                "format version {} is not the supported version {FORMAT_VERSION}",
                state.version
            )));
        }
        let mut seen = HashSet::with_capacity(state.allocations.len());
        for a in &state.allocations {
            if a.port == 0 {
                return Err(self.corrupt("lists port 0"));
            }
            if a.owner == 0 {
                return Err(self.corrupt(format!("port {} has owner 0 (reserved)", a.port)));
            }
            if !seen.insert(a.port) {
                return Err(self.corrupt(format!("port {} is listed twice", a.port)));
            }
        }
        Ok(state.allocations)
    }

    /// Move a corrupt state file aside (`ports.json.corrupt-<unix ms>`) so
    /// the operator keeps it while the appliance starts empty; the next save
    /// would otherwise overwrite it. Returns the new name.
    pub fn quarantine(&self) -> Result<PathBuf, PortError> {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let kept = self
            .path
            .with_file_name(format!("{STATE_FILE_NAME}.corrupt-{ms}"));
        fs::rename(&self.path, &kept).map_err(|e| self.io("rename", &kept, e))?;
        Ok(kept)
    }

    /// Remove temp files a killed process left behind mid-save (they were
    /// never renamed into place, so they hold nothing the file lacks).
    /// Only names of this store's own pattern are touched. Returns how many.
    pub fn remove_stale_temp_files(&self) -> usize {
        let Some(dir) = self.path.parent() else {
            return 0;
        };
        let prefix = format!(".{STATE_FILE_NAME}.tmp.");
        let own = format!("{prefix}{}.", std::process::id());
        let Ok(entries) = fs::read_dir(dir) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            // Never a temp file of this process's own saves in flight.
            if name.starts_with(&prefix)
                && !name.starts_with(&own)
                && fs::remove_file(e.path()).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Replace the file with `allocs`, atomically: a reader (or a crash)
    /// sees either the old file or the new one, never a torn one. Temp file
    /// in the same directory (rename is atomic only within a file system),
    /// write, fsync, rename over, fsync the directory so the rename itself
    /// survives power loss. The temp file is removed on failure.
    pub fn save(&self, allocs: &[Allocation]) -> Result<(), PortError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(|e| self.io("create directory", &dir, e))?;

        let mut sorted = allocs.to_vec();
        sorted.sort_unstable_by_key(|a| a.port);
        let state = StateFile {
            version: FORMAT_VERSION,
            allocations: sorted,
        };
        let mut bytes = serde_json::to_vec_pretty(&state)
            .map_err(|e| self.corrupt(format!("cannot serialize port state: {e}")))?;
        bytes.push(b'\n');

        // Unique per process and per save, so concurrent saves never write
        // into the same temp file; the last rename wins.
        let tmp = dir.join(format!(
            ".{STATE_FILE_NAME}.tmp.{}.{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| self.io("create", &tmp, e))?;
            f.write_all(&bytes).map_err(|e| self.io("write", &tmp, e))?;
            f.sync_all().map_err(|e| self.io("fsync", &tmp, e))?;
            // Fault tests kill the process here, between the temp file and
            // the rename (the `failpoints` feature only).
            #[cfg(feature = "failpoints")]
            fail::fail_point!("ports-save-before-rename");
            fs::rename(&tmp, &self.path).map_err(|e| self.io("rename", &self.path, e))
        })();
        if let Err(e) = written {
            // Best effort: the original error is what the caller needs.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io("fsync directory", &dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(port: u16, owner: u64) -> Allocation {
        Allocation {
            port,
            owner,
            allocated_at_unix_ms: 1_700_000_000_000 + u64::from(port),
        }
    }

    fn corrupt_reason(r: Result<Vec<Allocation>, PortError>) -> String {
        match r {
            Err(PortError::Corrupt { reason, .. }) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = PortStore::new(dir.path());
        assert_eq!(store.load().unwrap(), vec![]);
        assert_eq!(store.path(), dir.path().join("ports.json"));
    }

    #[test]
    fn round_trip_is_sorted_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = PortStore::new(dir.path());
        let allocs = vec![alloc(6105, 7), alloc(6100, u64::MAX), alloc(6999, 1)];
        store.save(&allocs).unwrap();
        let mut expect = allocs.clone();
        expect.sort_by_key(|a| a.port);
        assert_eq!(store.load().unwrap(), expect);
        assert_eq!(dir_entries(dir.path()), vec!["ports.json"]);

        // Overwrite with fewer entries, then with none.
        store.save(&allocs[..1]).unwrap();
        assert_eq!(store.load().unwrap(), vec![alloc(6105, 7)]);
        store.save(&[]).unwrap();
        assert_eq!(store.load().unwrap(), vec![]);
        assert_eq!(dir_entries(dir.path()), vec!["ports.json"]);
    }

    #[test]
    fn save_creates_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let store = PortStore::new(&nested);
        store.save(&[alloc(7000, 3)]).unwrap();
        assert_eq!(store.load().unwrap(), vec![alloc(7000, 3)]);
    }

    #[test]
    fn failed_save_keeps_the_old_file_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = PortStore::new(dir.path());
        store.save(&[alloc(7000, 3)]).unwrap();
        // A directory where the state file should be: rename fails.
        let blocked_dir = dir.path().join("blocked");
        fs::create_dir_all(blocked_dir.join("ports.json/inner")).unwrap();
        let blocked = PortStore::new(&blocked_dir);
        let err = blocked.save(&[alloc(7001, 4)]).unwrap_err();
        assert!(matches!(err, PortError::Io { op: "rename", .. }), "{err:?}");
        assert_eq!(dir_entries(&blocked_dir), vec!["ports.json"]);
        assert_eq!(store.load().unwrap(), vec![alloc(7000, 3)]);
    }

    #[test]
    fn concurrent_saves_never_tear_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = PortStore::new(dir.path());
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let store = &store;
                s.spawn(move || {
                    for i in 0..20u16 {
                        let n = (t as u16 * 20 + i) % 50 + 1;
                        let allocs: Vec<_> = (0..n).map(|k| alloc(10_000 + k, t + 1)).collect();
                        store.save(&allocs).unwrap();
                        // Whatever we read is one complete save.
                        let read = store.load().unwrap();
                        assert!(!read.is_empty());
                        let owner = read[0].owner;
                        assert!(read.iter().all(|a| a.owner == owner));
                    }
                });
            }
        });
        assert_eq!(dir_entries(dir.path()), vec!["ports.json"]);
    }

    #[test]
    fn corrupt_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = PortStore::new(dir.path());
        let write = |s: &str| fs::write(store.path(), s).unwrap();

        write("{not json");
        let r = store.load();
        if let Err(e) = &r {
            assert_eq!(e.code(), "port_state_corrupt");
            assert!(e.to_string().contains("ports.json"), "{e}");
        }
        assert!(corrupt_reason(r).contains("not valid port state JSON"));

        write("");
        assert!(corrupt_reason(store.load()).contains("JSON"));
        write(r#"{"version":2,"allocations":[]}"#);
        assert!(corrupt_reason(store.load()).contains("version 2"));
        write(r#"{"version":1,"allocations":[{"port":70000,"owner":1,"allocated_at_unix_ms":0}]}"#);
        assert!(corrupt_reason(store.load()).contains("JSON"));
        write(r#"{"version":1,"allocations":[{"port":0,"owner":1,"allocated_at_unix_ms":0}]}"#);
        assert!(corrupt_reason(store.load()).contains("port 0"));
        write(r#"{"version":1,"allocations":[{"port":6100,"owner":0,"allocated_at_unix_ms":0}]}"#);
        assert!(corrupt_reason(store.load()).contains("owner 0"));
        write(
            r#"{"version":1,"allocations":[
                {"port":6100,"owner":1,"allocated_at_unix_ms":0},
                {"port":6100,"owner":2,"allocated_at_unix_ms":0}]}"#,
        );
        assert!(corrupt_reason(store.load()).contains("listed twice"));

        // Unknown extra fields are tolerated (a newer minor writer).
        write(
            r#"{"version":1,"note":"x","allocations":[{"port":6100,"owner":1,"allocated_at_unix_ms":5,"extra":true}]}"#,
        );
        assert_eq!(
            store.load().unwrap(),
            vec![Allocation {
                port: 6100,
                owner: 1,
                allocated_at_unix_ms: 5
            }]
        );

        // Over the size cap: refused without parsing.
        let big = vec![b' '; MAX_STATE_FILE_BYTES as usize + 1];
        fs::write(store.path(), big).unwrap();
        assert!(corrupt_reason(store.load()).contains("larger than"));
    }

    #[test]
    fn a_corrupt_file_is_kept_aside_and_stale_temp_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = PortStore::new(dir.path());
        fs::write(dir.path().join(STATE_FILE_NAME), "{not json").unwrap();
        assert!(matches!(store.load(), Err(PortError::Corrupt { .. })));
        let kept = store.quarantine().unwrap();
        assert_eq!(fs::read_to_string(&kept).unwrap(), "{not json");
        assert!(kept
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("ports.json.corrupt-"));
        assert_eq!(store.load().unwrap(), Vec::new());
        // A dead process's temp file goes; other files stay.
        let stale = dir
            .path()
            .join(format!(".{STATE_FILE_NAME}.tmp.999999999.3"));
        fs::write(&stale, "x").unwrap();
        fs::write(dir.path().join("other"), "y").unwrap();
        assert_eq!(store.remove_stale_temp_files(), 1);
        assert!(!stale.exists());
        assert!(dir.path().join("other").exists() && kept.exists());
    }
}
