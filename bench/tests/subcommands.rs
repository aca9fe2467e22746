//! End-to-end: each subcommand of the bench binary, small and fast, against
//! the plain relay only (no consolegate or websockify needed), checking the
//! reports it writes. Everything listens on 127.0.0.1 and every run is
//! bounded by the subcommand's own limits plus a timeout here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cg-bench-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs the bench with `args`, killing it after `limit`; returns its stderr.
fn bench(args: &[&str], out: &Path, limit: Duration) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_consolegate-bench"))
        // Meant for this test only: the appliance refuses CONSOLEGATE_*
        // variables that name no setting.
        .env_remove("CONSOLEGATE_TEST_BIN")
        .args(args)
        .arg("--out-dir")
        .arg(out)
        .arg("--proxies")
        .arg("plain-relay")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bench");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(status.success(), "{args:?} failed ({status}):\n{err}");
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn throughput_measures_the_relay_child_both_ways() {
    let out = out_dir("tp");
    bench(
        &[
            "throughput",
            "--throughput-bytes",
            "32MiB",
            "--throughput-warmup-bytes",
            "1MiB",
            "--throughput-runs",
            "1",
            "--throughput-sessions",
            "2",
        ],
        &out,
        Duration::from_secs(60),
    );
    let r = json(out.join("throughput.json"));
    let ms = r["measurements"].as_array().unwrap();
    assert_eq!(ms.len(), 2);
    for m in ms {
        assert_eq!(m["ok"], true, "{m}");
        assert!(m["bytes"].as_u64().unwrap() >= 32 << 20, "{m}");
        assert!(m["proxy_cpu_s"].as_f64().is_some(), "{m}");
    }
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn memory_holds_and_probes_sessions_through_the_relay() {
    let out = out_dir("mem");
    bench(
        &[
            "memory",
            "--memory-proxies",
            "plain-relay",
            "--memory-sessions",
            "40",
            "--memory-hold-ms",
            "100",
        ],
        &out,
        Duration::from_secs(60),
    );
    let r = json(out.join("memory.json"));
    let c = &r["cells"][0];
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["held"], 40, "{c}");
    assert_eq!(c["live"], 40, "{c}");
    // Two relay threads per session: the relay's memory grows.
    assert!(c["pss_per_session_kib"].as_f64().unwrap() > 0.0, "{c}");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn handshakes_and_all_write_their_reports() {
    let out = out_dir("hs");
    bench(
        &[
            "handshakes",
            "--handshake-proxies",
            "plain-relay",
            "--handshakes",
            "300",
            "--handshake-warmup",
            "20",
            "--handshake-runs",
            "1",
        ],
        &out,
        Duration::from_secs(60),
    );
    let r = json(out.join("handshakes.json"));
    let m = &r["measurements"][0];
    assert_eq!(m["ok"], true, "{m}");
    assert_eq!(m["completed"], 300, "{m}");

    let out2 = out_dir("all");
    bench(
        &[
            "all",
            "--runs",
            "1",
            "--concurrency",
            "1,4",
            "--round-trips",
            "100",
            "--warmup",
            "10",
            "--throughput-bytes",
            "16MiB",
            "--throughput-warmup-bytes",
            "1MiB",
            "--throughput-runs",
            "1",
            "--memory-proxies",
            "plain-relay",
            "--memory-sessions",
            "20",
            "--memory-hold-ms",
            "100",
            "--handshake-proxies",
            "plain-relay",
            "--handshakes",
            "100",
            "--handshake-warmup",
            "10",
            "--handshake-runs",
            "1",
        ],
        &out2,
        Duration::from_secs(120),
    );
    let r = json(out2.join("report.json"));
    assert!(r["latency"]["median"].as_array().unwrap().len() >= 2);
    assert!(r["throughput"]["median"].is_array());
    assert_eq!(r["memory"]["cells"][0]["live"], 20);
    assert_eq!(r["handshakes"]["measurements"][0]["completed"], 100);
    // The key must be there (a missing section reads as null too); null
    // only for an unlimited hard limit, which this process would share.
    let tuning = r["tuning"]
        .as_object()
        .expect("report.json has a tuning section");
    let hard = tuning
        .get("nofile_hard")
        .expect("tuning.nofile_hard is reported");
    let ours = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    assert_eq!(
        hard.as_u64(),
        ours,
        "tuning.nofile_hard is this machine's hard limit"
    );
    let md = std::fs::read_to_string(out2.join("report.md")).unwrap();
    assert!(
        md.contains("## Summary") && md.contains("## Host limits"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out2.join("latency.svg")).unwrap();
    assert!(svg.contains("<polyline"));
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(out2);
}

/// The consolegate binary Cargo built for this test run: the one in this
/// test executable's own target directory and profile (`<target>/<profile>/
/// deps/subcommands-<hash>` → `<target>/<profile>/consolegate`), never a
/// `target/release` build that may be older than the code. `cargo test
/// --workspace` builds it (the consolegate package's integration tests need
/// it), and so does `make test` (`cargo build --bins` first).
/// `CONSOLEGATE_TEST_BIN` names another one on purpose (as in tests/common).
/// Missing, or older than a source file of the consolegate package, is a
/// failure, never a skip and never a silent test of stale code.
fn consolegate_under_test() -> PathBuf {
    if let Some(p) = std::env::var_os("CONSOLEGATE_TEST_BIN") {
        return PathBuf::from(p);
    }
    let me = std::env::current_exe().expect("this test's executable");
    let profile_dir = me
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in <target>/<profile>/deps");
    let exe = profile_dir.join("consolegate");
    let built = std::fs::metadata(&exe)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: build it first (`cargo build --bins`, or run `cargo test --workspace`; make test does)",
                exe.display()
            )
        });
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some((newer, at)) = newest_source(&root) {
        assert!(
            built >= at,
            "{} is older than {} (stale build): run `cargo build --bins` (make test does)",
            exe.display(),
            newer.display()
        );
    }
    exe
}

/// The most recently modified file among the consolegate package's sources
/// (src/**, Cargo.toml, Cargo.lock).
fn newest_source(root: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    let mut stack = vec![root.join("src")];
    let mut files = vec![root.join("Cargo.toml"), root.join("Cargo.lock")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for f in files {
        if let Ok(at) = std::fs::metadata(&f).and_then(|m| m.modified()) {
            if newest.as_ref().is_none_or(|(_, t)| at > *t) {
                newest = Some((f, at));
            }
        }
    }
    newest
}

/// session-start against the real appliance: the binary of this build
/// ([`consolegate_under_test`]).
#[test]
fn session_start_measures_the_appliance() {
    let exe = consolegate_under_test();
    let out = out_dir("ss");
    bench(
        &[
            "session-start",
            "--consolegate",
            exe.to_str().unwrap(),
            "--session-start-proxies",
            "consolegate-epoll",
            "--session-start-concurrency",
            "1,2",
            "--session-start-samples",
            "30",
            "--session-start-warmup",
            "5",
        ],
        &out,
        Duration::from_secs(120),
    );
    let r = json(out.join("session-start.json"));
    let cells = r["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 4, "shared and dedicated × c=1,2");
    for c in cells {
        assert_eq!(c["ok"], true, "{c}");
        assert_eq!(c["completed"], 30, "{c}");
        assert_eq!(c["greeting"], "RFB 003.008\n", "{c}");
        let p = &c["percentiles"];
        // Each sample's total is the sum of its parts, so the median total
        // is at least each part's median, and every part takes some time.
        let total = p["total"]["p50_us"].as_f64().unwrap();
        for k in ["api", "upgrade", "first_byte"] {
            let part = p[k]["p50_us"].as_f64().unwrap();
            assert!(
                part > 0.0 && part <= total,
                "{k} p50 {part} vs total p50 {total}: {c}"
            );
        }
        assert!(c["hgrm"]["total"].is_string(), "{c}");
        assert!(out.join(c["hgrm"]["api"].as_str().unwrap()).is_file());
    }
    let _ = std::fs::remove_dir_all(out);
}

/// downstream-bulk against the real proxy ([`consolegate_under_test`]),
/// both io backends: several sessions at once, every byte arrives, the CPU
/// is split by thread class, and the proxy's log says which fast path
/// carried the bytes (splice on epoll, bulk receives on io_uring).
#[test]
fn downstream_bulk_splits_the_proxy_cpu_by_thread() {
    let exe = consolegate_under_test();
    let out = out_dir("bulk");
    bench(
        &[
            "downstream-bulk",
            "--consolegate",
            exe.to_str().unwrap(),
            "--bulk-proxies",
            "consolegate-epoll,consolegate-uring",
            "--bulk-runs",
            "1",
            "--bulk-sessions",
            "3",
            // Long enough for tens of clock ticks of the proxy's CPU: with a
            // few ticks only, per-thread and process counters round apart
            // and a worker's share can read as 0.
            "--bulk-bytes",
            "384MiB",
            "--bulk-warmup-bytes",
            "1MiB",
        ],
        &out,
        Duration::from_secs(120),
    );
    let r = json(out.join("downstream-bulk.json"));
    let ms = r["measurements"].as_array().unwrap();
    assert_eq!(ms.len(), 2, "one run of each backend: {r}");
    for m in ms {
        assert_eq!(m["ok"], true, "{m}");
        assert!(m["bytes"].as_u64().unwrap() >= 48 << 20, "{m}");
        let cpu = m["proxy_cpu_s"].as_f64().unwrap();
        assert!(cpu > 0.0, "{m}");
        // The classes add up to the process total (tick rounding aside).
        let t = &m["threads"];
        let sum: f64 = ["worker_s", "io_wq_s", "sqpoll_s", "other_s", "exited_s"]
            .iter()
            .map(|k| t[k].as_f64().unwrap())
            .sum();
        assert!((sum - cpu).abs() < 0.05, "{sum} vs {cpu}: {m}");
        assert!(t["worker_s"].as_f64().unwrap() > 0.0, "{m}");
        // Every session closed and logged its bytes.
        let log = &m["log"];
        assert_eq!(log["sessions_closed"], 3, "{m}");
        let down = log["bytes_down"].as_u64().unwrap();
        assert!(down >= 48 << 20, "{m}");
        // Both backends splice bulk downstream by default (io_uring's
        // `uring_splice`); bulk receives are io_uring's path with it off.
        assert!(
            log["bytes_spliced"].as_u64().unwrap() > down / 2,
            "bytes_spliced: {m}"
        );
    }
    let text = std::fs::read_to_string(out.join("downstream-bulk.txt")).unwrap();
    assert!(text.contains("| consolegate-uring"), "{text}");
    let _ = std::fs::remove_dir_all(out);
}

/// webmks against the real appliance ([`consolegate_under_test`]): `vnc` and
/// `webmks` sessions of one appliance, their baselines, TLS alone, and the
/// targets, all in a small run.
#[test]
fn webmks_compares_the_two_relay_kinds_of_the_appliance() {
    let exe = consolegate_under_test();
    let out = out_dir("webmks");
    bench(
        &[
            "webmks",
            "--consolegate",
            exe.to_str().unwrap(),
            "--proxies",
            "consolegate-epoll",
            "--runs",
            "1",
            "--webmks-concurrency",
            "1,2",
            "--round-trips",
            "50",
            "--warmup",
            "5",
            "--throughput-bytes",
            "16MiB",
            "--throughput-warmup-bytes",
            "1MiB",
            "--webmks-tls-bytes",
            "8MiB",
        ],
        &out,
        Duration::from_secs(180),
    );
    let r = json(out.join("webmks.json"));
    let run = &r["runs"][0];
    let lat = run["latency"].as_array().unwrap();
    // direct-tcp, direct-wss, vnc, webmks × c=1,2.
    assert_eq!(lat.len(), 8, "{run}");
    for c in lat {
        assert_eq!(c["ok"], true, "{c}");
        let rts = if c["concurrency"] == 1 { 50 } else { 100 };
        assert_eq!(c["round_trips"], rts, "{c}");
        if c["via"] == "vnc" || c["via"] == "webmks" {
            assert!(c["added"]["p50_us"].is_number(), "{c}");
        }
    }
    let tp = run["throughput"].as_array().unwrap();
    assert_eq!(tp.len(), 4, "vnc and webmks × down and up: {run}");
    for c in tp {
        assert_eq!(c["ok"], true, "{c}");
        assert!(c["bytes"].as_u64().unwrap() >= 16 << 20, "{c}");
        // 16 MiB may take less CPU than one clock tick (10 ms) of the
        // proxy's /proc counters on a quiet machine: 0 is a real reading.
        let cpu = c["cpu_s_per_gb"].as_f64().unwrap();
        assert!(cpu.is_finite() && cpu >= 0.0, "{c}");
    }
    assert!(run["tls"]["decrypt_cpu_s_per_gb"].as_f64().unwrap() > 0.0);
    let suite = run["backend_cipher_suite"].as_str().unwrap();
    assert_eq!(suite, run["tls"]["cipher_suite"].as_str().unwrap());
    let targets = r["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 4, "2 latency + 2 CPU targets: {targets:?}");
    for t in targets {
        let latency = t["target"].as_str().unwrap().contains("added p50");
        // A latency ratio has no value when the VNC relay's added p50 came
        // out at or below 0 (its baseline's p50 was the slower one, which a
        // loaded 2-vCPU VM does); then it is neither met nor missed.
        let undefined = latency && t["value"].is_null() && t["met"].is_null();
        assert!(t["value"].is_number() || undefined, "{t}");
    }
    let text = std::fs::read_to_string(out.join("webmks.txt")).unwrap();
    assert!(text.contains("webmks ÷ (vnc + TLS)"), "{text}");
    assert!(out.join("hgrm/webmks/webmks-epoll-c2.hgrm").is_file());
    let _ = std::fs::remove_dir_all(out);
}

/// hypervisors against the real appliance ([`consolegate_under_test`]) and
/// the real govmomi simulator (built with Debian's Go and govmomi, cached in
/// target/bench-vcsim): one small run of both parts. Every storm thumbnail
/// must be its own snapshot of the slow VNC server, every pool thumbnail
/// its own /screen fetch, within pool_size logins and without an error.
#[test]
fn hypervisors_measures_storm_and_pool() {
    let exe = consolegate_under_test();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let source = root.join("tests/support/vcsim/main.go");
    let vcsim_dir = root.join("target/bench-vcsim");
    let out = out_dir("hv");
    bench(
        &[
            "hypervisors",
            "--consolegate",
            exe.to_str().unwrap(),
            "--hv-runs",
            "1",
            "--hv-storm-thumbnails",
            "16",
            "--hv-storm-opens",
            "10",
            "--hv-pool-users",
            "2",
            "--hv-pool-thumbnails",
            "5",
            "--hv-pool-user-connections",
            "2",
            "--hv-vcsim-source",
            source.to_str().unwrap(),
            "--hv-vcsim-dir",
            vcsim_dir.to_str().unwrap(),
        ],
        &out,
        Duration::from_secs(600),
    );
    let r = json(out.join("hypervisors.json"));
    let cells = r["storm_runs"][0].as_array().unwrap();
    let names: Vec<&str> = cells.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["critical_reserve=1", "critical_reserve=0", "no storm"]
    );
    for c in cells {
        assert_eq!(c["ok"], true, "{c}");
        assert!(c["opens"].as_u64().unwrap() > 0, "{c}");
        assert!(c["open_latency"]["p99_us"].as_f64().unwrap() > 0.0, "{c}");
        if c["storm"] == true {
            assert_eq!(c["thumbnails_ok"], 16, "{c}");
            assert_eq!(c["vnc_connections"], 16, "{c}");
            assert!(c["min_thumbnails_waiting"].as_u64().unwrap() > 0, "{c}");
        } else {
            assert_eq!(c["vnc_connections"], 0, "{c}");
        }
    }
    let p = &r["pool_runs"][0];
    assert_eq!(p["ok"], true, "{p}");
    assert_eq!(p["requests"], 12, "{p}");
    assert_eq!(p["errors"], 0, "{p}");
    assert_eq!(p["screens"], 10, "{p}");
    let logins = p["logins"].as_u64().unwrap();
    // The pool's 4 sessions at most, plus the WaitForUpdatesEx follower's.
    assert!((1..=5).contains(&logins), "{p}");
    assert!(p["peak_active_sessions"].as_u64().unwrap() <= logins, "{p}");
    assert_eq!(p["active_after_stop"], 0, "logged out on stop: {p}");
    assert!(std::fs::read_to_string(out.join("hypervisors.txt"))
        .unwrap()
        .contains("Pool economy"));
    let _ = std::fs::remove_dir_all(out);
}

/// The debug appliance binary that `make test` builds just before the
/// tests (with or without failpoints: the soak works with either). Not the
/// release one, which may be older than the code under test. Missing is a
/// failure, not a skip.
fn debug_appliance() -> PathBuf {
    let exe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/consolegate");
    assert!(
        exe.is_file(),
        "no {}: run `cargo build --bins` first (make test does)",
        exe.display()
    );
    exe
}

/// Runs `consolegate-bench soak` with `args`, killing it after `limit`;
/// returns whether it succeeded and its stderr.
fn soak(args: &[&str], out: &Path, limit: Duration) -> (bool, String) {
    let exe = debug_appliance();
    let mut child = Command::new(env!("CARGO_BIN_EXE_consolegate-bench"))
        .arg("soak")
        .arg("--consolegate")
        .arg(&exe)
        .arg("--out-dir")
        .arg(out)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bench");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.success(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("soak {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A 20-second soak of the real appliance (epoll): every churn kind runs
/// and succeeds, the expected refusals come back with their documented
/// statuses, the steady relays flow, the appliance releases everything at
/// the end, and the reports (JSON, Markdown, SVG) hold the samples and a
/// passing verdict.
#[test]
fn soak_smoke_runs_every_lifecycle_path_and_passes() {
    let out = out_dir("soak");
    let (ok, err) = soak(
        &[
            "--io",
            "epoll",
            "--duration-s",
            "20",
            "--interval-s",
            "1",
            "--steady-sessions",
            "10",
            "--churn-per-s",
            "12",
        ],
        &out,
        Duration::from_secs(120),
    );
    assert!(ok, "soak failed:\n{err}");
    let r = json(out.join("soak.json"));
    let samples = r["samples"].as_array().unwrap();
    assert!(samples.len() >= 19, "{} samples", samples.len());
    for s in samples {
        assert!(s["fds"].as_u64().unwrap() > 20, "{s}");
        assert!(s["rss_kib"].as_u64().unwrap() > 1024, "{s}");
        // The steady sessions are open by then, even on a busy machine.
        if s["t_s"].as_f64().unwrap() >= 5.0 {
            assert!(s["live_sessions"].as_u64().unwrap() >= 10, "{s}");
            assert!(s["sessions_remembered"].as_u64().unwrap() >= 10, "{s}");
        }
        assert!(s["buffer_chunks_free"].as_u64().is_some(), "{s}");
    }
    let t = &r["totals"];
    assert_eq!(t["unexpected_errors"], 0, "{t}");
    for (kind, counts) in t["churn_by_kind"].as_object().unwrap() {
        assert!(counts["ok"].as_u64().unwrap() > 0, "{kind}: {counts}");
        assert_eq!(counts["failed"], 0, "{kind}: {counts}");
    }
    assert_eq!(t["churn_by_kind"].as_object().unwrap().len(), 10);
    // Replays and bad tickets → 403, expired tickets → 410.
    assert!(t["expected_refusals"]["403"].as_u64().unwrap() >= 20, "{t}");
    assert!(t["expected_refusals"]["410"].as_u64().unwrap() >= 10, "{t}");
    assert!(t["sessions_revoked"].as_u64().unwrap() >= 15, "{t}");
    assert!(t["expiries_confirmed"].as_u64().unwrap() >= 20, "{t}");
    // 10 sessions × 10 round trips/s × 20 s, at least half of it.
    assert!(t["steady_round_trips"].as_u64().unwrap() >= 1000, "{t}");
    assert!(t["relay"]["p99_us"].as_f64().unwrap() > 0.0, "{t}");
    assert!(
        r["settled_after_s"].as_f64().is_some(),
        "{}",
        r["settled_after_s"]
    );
    assert!(r["fd_kinds_after"]["socket"].as_u64().is_some(), "{r}");
    let v = &r["verdict"];
    assert_eq!(v["pass"], true, "{v}");
    // The warm-up is half of so short a run: samples from 10 s to 20 s.
    assert_eq!(v["judged_from_s"].as_f64().unwrap(), 10.0, "{v}");
    assert!(v["judged_samples"].as_u64().unwrap() >= 9, "{v}");
    assert!(v["fds"]["first_third_mean"].as_f64().unwrap() > 20.0, "{v}");
    // The p99's course is reported (not judged): a median per third.
    let f = &r["figures"];
    let thirds = f["relay_p99_us_third_medians"].as_array().unwrap();
    assert_eq!(thirds.len(), 3, "{f}");
    assert!(thirds.iter().all(|v| v.as_f64().unwrap() > 0.0), "{f}");
    assert!(f["relay_p99_us_slope_per_hour"].as_f64().is_some(), "{f}");
    let md = std::fs::read_to_string(out.join("soak.md")).unwrap();
    assert!(
        md.starts_with("## Soak") && md.contains("**Verdict: PASS**"),
        "{md}"
    );
    assert!(
        md.contains("median of the first / middle / last third"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out.join("soak.svg")).unwrap();
    // fds; RSS, HWM; p50, p99, max; live, churn; CPU, pressure, load.
    let lines = svg.matches("<polyline").count();
    assert!((10..=11).contains(&lines), "{lines} lines:\n{svg}");
    assert!(out.join("logs/soak-appliance.log").is_file());
    let _ = std::fs::remove_dir_all(out);
}

/// A soak too short to judge fails with a non-zero exit and says why.
#[test]
fn soak_without_enough_samples_fails() {
    let out = out_dir("soak-short");
    let (ok, err) = soak(
        &[
            "--io",
            "epoll",
            "--duration-s",
            "3",
            "--interval-s",
            "1",
            "--steady-sessions",
            "2",
            "--churn-per-s",
            "5",
        ],
        &out,
        Duration::from_secs(60),
    );
    assert!(!ok, "a 3-sample soak passed:\n{err}");
    assert!(
        err.contains("soak FAILED") && err.contains("samples after the warm-up"),
        "{err}"
    );
    let r = json(out.join("soak.json"));
    assert_eq!(r["verdict"]["pass"], false);
    let md = std::fs::read_to_string(out.join("soak.md")).unwrap();
    assert!(md.contains("**Verdict: FAIL**"), "{md}");
    let _ = std::fs::remove_dir_all(out);
}
