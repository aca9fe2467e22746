//! `vm_metrics_update` end to end against a real appliance: real QEMU VMs
//! (the vCPU threads' CPU time and the process's memory, through QMP and
//! /proc) and govmomi's simulator (`summary.quickStats`). Figures are sent
//! only for VMs that have a subscriber in their `/ws/vm/{id}` room: the
//! appliance's debug log line per poll (`vm metrics polled vm_id=…`, target
//! `consolegate::vm_metrics`) counts the calls, so an unwatched VM is
//! proved never asked, and a VM whose room emptied is asked no more.
//!
//! Needs qemu-system-x86, golang-go and golang-github-vmware-govmomi-dev
//! (`make test` installs them). Every wait is bounded.

#[macro_use]
mod common;

use std::time::Duration;

use common::events::{events, EventsClient};
use common::qemu::{Qemu, QemuOptions};
use common::vcsim::{Vcsim, VcsimOptions, USERNAME};
use common::*;
use serde_json::{json, Value};

const IO: &str = "epoll";
const INTERVAL_MS: u64 = 500;
/// How long the first figures may take (two rounds and a margin).
const METRICS_DEADLINE: Duration = Duration::from_secs(15);
/// How long the test watches for what must not happen (several rounds).
const QUIET: Duration = Duration::from_millis(4 * INTERVAL_MS);
const MIB: u64 = 1024 * 1024;
/// Updates read at most while waiting for the vCPU time to grow.
const MAX_UPDATES_FOR_GROWTH: usize = 10;

fn appliance_with(hypervisors_toml: &str) -> Appliance {
    set_current_io(IO);
    Appliance::start(
        IO,
        ApplianceOptions {
            extra_toml: format!(
                "\n[events]\nvm_refresh_interval_ms = 0\nmetrics_interval_ms = {INTERVAL_MS}\n\n{hypervisors_toml}"
            ),
            launch: Launch {
                env: vec![(
                    "RUST_LOG".into(),
                    "info,consolegate::vm_metrics=debug".into(),
                )],
                ..Launch::default()
            },
            ..ApplianceOptions::default()
        },
    )
}

/// Polls of `vm_id`'s figures the appliance logged so far.
fn polls(app: &Appliance, vm_id: &str) -> usize {
    let needle = format!("vm_id={vm_id}");
    std::fs::read_to_string(app.dir().join("stderr.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("vm metrics polled") && l.split_whitespace().any(|word| word == needle)
        })
        .count()
}

fn metrics_of(events: &mut EventsClient, vm_id: &str) -> Value {
    events.next_where_within("vm_metrics_update", METRICS_DEADLINE, |d| {
        d["vm_id"] == vm_id
    })
}

fn number(update: &Value, field: &str) -> f64 {
    update["data"][field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing: {update}"))
}

#[test]
fn qemu_figures_reach_a_vm_room_and_unwatched_vms_are_never_asked() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let watched = Qemu::start(dirs[0].path(), QemuOptions::default());
    let unwatched = Qemu::start(dirs[1].path(), QemuOptions::default());
    let app = appliance_with(&format!(
        "[[hypervisors]]\nkind = \"qemu\"\nid = \"kvm1\"\nreconnect_max_ms = 200\n\
         vms = [{{ id = \"web01\", qmp = {:?} }}, {{ id = \"web02\", qmp = {:?} }}]\n",
        watched.backend_qmp.display().to_string(),
        unwatched.backend_qmp.display().to_string()
    ));
    let mut monitor = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    // Nobody in a VM room: nothing is asked, nothing sent.
    let sent = monitor.all_of("vm_metrics_update", QUIET);
    assert!(sent.is_empty(), "figures nobody watches: {sent:?}");
    assert_eq!(polls(&app, "kvm1:web01") + polls(&app, "kvm1:web02"), 0);

    let mut room = events(app.control, "/ws/vm/kvm1:web01", Some(READ_TOKEN));
    let first = metrics_of(&mut room, "kvm1:web01");
    assert_eq!(first["data"]["server_id"], "kvm1", "{first}");
    assert!(
        first["data"].get("cpu_usage_percent").is_none(),
        "one sample is no rate: {first}"
    );
    // The idle guest (SeaBIOS waiting on its timer) still runs a little:
    // its vCPU time grows within a few updates, never shrinks.
    let cpu1 = number(&first, "cpu_time_ns");
    let mut second = metrics_of(&mut room, "kvm1:web01");
    for _ in 0..MAX_UPDATES_FOR_GROWTH {
        assert!(
            number(&second, "cpu_time_ns") >= cpu1,
            "{first} then {second}"
        );
        if number(&second, "cpu_time_ns") > cpu1 {
            break;
        }
        second = metrics_of(&mut room, "kvm1:web01");
    }
    assert!(
        number(&second, "cpu_time_ns") > cpu1,
        "the vCPU time grows: {first} then {second}"
    );
    let cpu_percent = number(&second, "cpu_usage_percent");
    assert!((0.0..=100.5).contains(&cpu_percent), "{second}");
    // The guest's size as QEMU itself reports it to the test's own socket.
    let size = watched
        .qmp()
        .execute("query-memory-size-summary", json!({}))
        .expect("query-memory-size-summary")["base-memory"]
        .as_u64()
        .unwrap();
    assert_eq!(
        number(&second, "memory_size_mb") as u64,
        size / MIB,
        "{second}"
    );
    // In use: the QEMU process's resident memory, as /proc says it.
    let rss_mb = rss_bytes(watched.pid().unwrap()).unwrap() / MIB;
    let used_mb = number(&second, "memory_used_mb") as u64;
    assert!(
        used_mb > 0 && used_mb.abs_diff(rss_mb) <= rss_mb / 2 + 8,
        "memory_used_mb {used_mb} vs the process's {rss_mb} MiB: {second}"
    );
    assert!(number(&second, "memory_usage_percent") > 0.0, "{second}");
    assert!(
        second["data"].get("network_rx_bytes").is_none(),
        "not counted, so left out: {second}"
    );

    // The monitor sees the watched VM's figures, never the other's.
    let seen = monitor.all_of("vm_metrics_update", QUIET);
    assert!(!seen.is_empty(), "the monitor gets the room's figures too");
    assert!(
        seen.iter().all(|v| v["data"]["vm_id"] == "kvm1:web01"),
        "{seen:?}"
    );
    assert!(polls(&app, "kvm1:web01") >= 2);
    assert_eq!(polls(&app, "kvm1:web02"), 0, "the unwatched VM was asked");

    // The room empties: the VM is asked no more.
    drop(room);
    monitor.all_of("vm_metrics_update", Duration::from_millis(2 * INTERVAL_MS));
    let settled = polls(&app, "kvm1:web01");
    let late = monitor.all_of("vm_metrics_update", QUIET);
    assert!(late.is_empty(), "figures after the room emptied: {late:?}");
    assert_eq!(polls(&app, "kvm1:web01"), settled);
    eprintln!(
        "QEMU figures: {second} (load {})",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    drop(unwatched);
}

#[test]
fn vsphere_figures_come_from_quick_stats_for_watched_vms_only() {
    let sim = Vcsim::start(VcsimOptions::default());
    let app = appliance_with(&format!(
        "[[hypervisors]]\nkind = \"vsphere\"\nid = \"esx1\"\nurl = {:?}\nusername = {USERNAME:?}\n\
         password_file = {:?}\nthumbprint = {:?}\npool_size = 2\nrequest_timeout_ms = 10000\n",
        sim.url,
        sim.password_file().display().to_string(),
        sim.thumbprint
    ));
    let vms = app.get_json("/api/v1/vms");
    let list = vms["vms"].as_array().expect("a VM list");
    let id_of = |name: &str| {
        list.iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["id"].as_str())
            .unwrap_or_else(|| panic!("no {name} in {vms}"))
            .to_string()
    };
    let (watched, other) = (id_of("DC0_H0_VM0"), id_of("DC0_H0_VM1"));
    let mut room = events(app.control, &format!("/ws/vm/{watched}"), Some(ADMIN_TOKEN));
    let update = metrics_of(&mut room, &watched);
    assert_eq!(update["data"]["server_id"], "esx1", "{update}");
    assert!(number(&update, "memory_size_mb") > 0.0, "{update}");
    assert!(number(&update, "memory_used_mb") >= 0.0, "{update}");
    assert!(
        update["data"].get("cpu_time_ns").is_none(),
        "vSphere gives no cumulative CPU time: {update}"
    );
    metrics_of(&mut room, &watched);
    assert!(polls(&app, &watched) >= 2);
    assert_eq!(polls(&app, &other), 0, "the unwatched VM was asked");
}
