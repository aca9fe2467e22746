//! `vm_metrics_update` end to end against a real appliance: real QEMU VMs
//! (the vCPU threads' CPU time and the process's memory, through QMP and
//! /proc; a tap device's counters, seen from the guest) and govmomi's
//! simulator (`summary.quickStats`, PerformanceManager's network rates). Figures are sent
//! only for VMs that have a subscriber in their `/ws/vm/{id}` room: the
//! appliance's debug log line per poll (`vm metrics polled vm_id=…`, target
//! `consolegate::vm_metrics`) counts the calls, so an unwatched VM is
//! proved never asked, and a VM whose room emptied is asked no more.
//!
//! Needs qemu-system-x86, iproute2, golang-go and
//! golang-github-vmware-govmomi-dev (`make test` installs them), and root
//! for the tap device. Every wait is bounded.

#[macro_use]
mod common;

use std::time::Duration;

use common::events::{events, EventsClient};
use common::qemu::{Qemu, QemuBalloon, QemuOptions, Tap};
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

/// The update's network figures are the tap's counters, crossed: the
/// guest receives what the host sends into the tap, and sends what the
/// host receives from it.
fn assert_crossed(update: &Value, tap: &Tap) {
    assert_eq!(
        number(update, "network_rx_bytes") as u64,
        tap.counter("tx_bytes"),
        "guest rx = tap tx: {update}"
    );
    assert_eq!(
        number(update, "network_tx_bytes") as u64,
        tap.counter("rx_bytes"),
        "guest tx = tap rx: {update}"
    );
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
    assert_eq!(second["data"]["memory_source"], "process", "{second}");
    for field in ["network_rx_bytes", "network_tx_bytes"] {
        assert!(
            second["data"].get(field).is_none(),
            "a VM without a tap has no network figures: {second}"
        );
    }

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

/// The balloon statistics interval the appliance is configured with.
const BALLOON_POLLING_S: u64 = 2;
/// The interval an operator set before the appliance looked.
const OPERATORS_POLLING_S: u64 = 7;

/// A balloon device's statistics polling interval, asked on the test's own
/// QMP socket.
fn polling_interval(qemu: &Qemu, device: &str) -> u64 {
    qemu.qmp()
        .execute(
            "qom-get",
            json!({"path": device, "property": "guest-stats-polling-interval"}),
        )
        .unwrap_or_else(|e| panic!("qom-get {device}: {e}"))
        .as_u64()
        .unwrap()
}

/// A VM with a balloon device gets its statistics polling turned on
/// (once, at the configured interval; an operator's interval is kept). The
/// diskless guests have no balloon driver, so they never report (QEMU's
/// `last-update` stays 0): the figure is then the process's memory,
/// `memory_source` "process", as for a VM without a balloon. (A guest
/// that reports is covered by the unit tests of `guest_memory`, on
/// statistics of the shape QEMU holds them in; no guest OS runs here.)
#[test]
fn balloon_polling_is_turned_on_and_a_guest_without_a_driver_falls_back_to_the_process() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let named = Qemu::start(
        dirs[0].path(),
        QemuOptions {
            balloon: QemuBalloon::Named("balloon0".into()),
            ..QemuOptions::default()
        },
    );
    let anonymous = Qemu::start(
        dirs[1].path(),
        QemuOptions {
            balloon: QemuBalloon::Anonymous,
            ..QemuOptions::default()
        },
    );
    let anonymous_device = "/machine/peripheral-anon/device[0]";
    let set = anonymous.qmp().execute(
        "qom-set",
        json!({"path": anonymous_device, "property": "guest-stats-polling-interval",
               "value": OPERATORS_POLLING_S}),
    );
    set.unwrap_or_else(|e| panic!("qom-set: {e}"));
    assert_eq!(polling_interval(&named, "/machine/peripheral/balloon0"), 0);
    let app = appliance_with(&format!(
        "[[hypervisors]]\nkind = \"qemu\"\nid = \"kvm1\"\nreconnect_max_ms = 200\n\
         balloon_stats_polling_interval_s = {BALLOON_POLLING_S}\n\
         vms = [{{ id = \"b1\", qmp = {:?} }}, {{ id = \"b2\", qmp = {:?} }}]\n",
        named.backend_qmp.display().to_string(),
        anonymous.backend_qmp.display().to_string()
    ));
    // Nobody watches yet: nothing is turned on.
    let mut monitor = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    monitor.all_of("vm_metrics_update", QUIET);
    assert_eq!(polling_interval(&named, "/machine/peripheral/balloon0"), 0);

    for (vm, qemu, device, interval) in [
        (
            "kvm1:b1",
            &named,
            "/machine/peripheral/balloon0",
            BALLOON_POLLING_S,
        ),
        ("kvm1:b2", &anonymous, anonymous_device, OPERATORS_POLLING_S),
    ] {
        let mut room = events(app.control, &format!("/ws/vm/{vm}"), Some(READ_TOKEN));
        let update = metrics_of(&mut room, vm);
        assert_eq!(polling_interval(qemu, device), interval, "{vm}: {update}");
        let stats = qemu
            .qmp()
            .execute(
                "qom-get",
                json!({"path": device, "property": "guest-stats"}),
            )
            .unwrap_or_else(|e| panic!("qom-get guest-stats: {e}"));
        assert_eq!(stats["last-update"], 0, "no guest driver reported: {stats}");
        assert_eq!(update["data"]["memory_source"], "process", "{update}");
        let rss_mb = rss_bytes(qemu.pid().unwrap()).unwrap() / MIB;
        let used_mb = number(&update, "memory_used_mb") as u64;
        assert!(
            used_mb > 0 && used_mb.abs_diff(rss_mb) <= rss_mb / 2 + 8,
            "{vm}: memory_used_mb {used_mb} vs the process's {rss_mb} MiB: {update}"
        );
        // Later updates keep to it, and the interval stays as it is.
        let later = metrics_of(&mut room, vm);
        assert_eq!(later["data"]["memory_source"], "process", "{later}");
        assert_eq!(polling_interval(qemu, device), interval, "{vm}");
    }
    let turned_on = std::fs::read_to_string(app.dir().join("stderr.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("balloon statistics polling turned on"))
        .count();
    assert_eq!(turned_on, 1, "once, for the VM whose polling was off");
}

/// Broadcast datagrams sent into the tap from the host's side: the guest
/// receives them (the tap's `tx_bytes`), with no ARP first.
const DATAGRAMS_INTO_TAP: usize = 20;
const DATAGRAM_BYTES: usize = 200;

/// The next update of `vm_id` whose `network_rx_bytes` is at least `least`.
fn metrics_with_rx_at_least(room: &mut EventsClient, vm_id: &str, least: u64) -> Value {
    for _ in 0..MAX_UPDATES_FOR_GROWTH {
        let update = metrics_of(room, vm_id);
        if number(&update, "network_rx_bytes") as u64 >= least {
            return update;
        }
    }
    panic!("network_rx_bytes of {vm_id} never reached {least}");
}

#[test]
fn qemu_network_bytes_are_the_taps_counters_from_the_guests_side() {
    let dir = tempfile::tempdir().unwrap();
    let tap = Tap::create(0);
    let qemu = Qemu::start(
        dir.path(),
        QemuOptions {
            tap: Some(tap.name.clone()),
            ..QemuOptions::default()
        },
    );
    let app = appliance_with(&format!(
        "[[hypervisors]]\nkind = \"qemu\"\nid = \"kvm1\"\nreconnect_max_ms = 200\n\
         vms = [{{ id = \"net01\", qmp = {:?} }}]\n",
        qemu.backend_qmp.display().to_string()
    ));
    let mut room = events(app.control, "/ws/vm/kvm1:net01", Some(READ_TOKEN));
    // The tap is down and quiet, and the guest (no boot ROM, no disk)
    // sends nothing: the figures are the tap's counters, crossed.
    let first = metrics_of(&mut room, "kvm1:net01");
    assert_crossed(&first, &tap);
    // The host sends broadcasts into the tap: the guest's rx grows by them.
    tap.up_with("10.213.77.1/24");
    let before = tap.counter("tx_bytes");
    let socket = std::net::UdpSocket::bind("10.213.77.1:0").expect("bind on the tap's address");
    socket.set_broadcast(true).unwrap();
    for _ in 0..DATAGRAMS_INTO_TAP {
        socket
            .send_to(&[0x5a; DATAGRAM_BYTES], "10.213.77.255:9")
            .expect("send into the tap");
    }
    let sent = (DATAGRAMS_INTO_TAP * DATAGRAM_BYTES) as u64;
    wait_until(METRICS_DEADLINE, "the datagrams counted by the tap", || {
        (tap.counter("tx_bytes") >= before + sent).then_some(())
    });
    let after = metrics_with_rx_at_least(&mut room, "kvm1:net01", before + sent);
    // The guest still sent nothing: its tx is still the tap's rx.
    assert_crossed(&after, &tap);
    assert!(
        number(&after, "network_rx_bytes") > number(&first, "network_rx_bytes"),
        "{first} then {after}"
    );
    eprintln!("QEMU network figures: {first} then {after}");
    drop(app);
    drop(qemu);
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
    assert_eq!(update["data"]["memory_source"], "quick_stats", "{update}");
    assert!(
        update["data"].get("cpu_time_ns").is_none(),
        "vSphere gives no cumulative CPU time: {update}"
    );
    // Network: PerformanceManager's averaged rates (the simulator serves
    // canned samples), never cumulative bytes.
    for field in ["network_rx_bytes_per_s", "network_tx_bytes_per_s"] {
        let rate = update["data"][field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} missing or not an integer: {update}"));
        assert_eq!(rate % 1024, 0, "KBps × 1024: {update}");
    }
    for field in ["network_rx_bytes", "network_tx_bytes"] {
        assert!(
            update["data"].get(field).is_none(),
            "vSphere gives rates, not counts: {update}"
        );
    }
    metrics_of(&mut room, &watched);
    assert!(polls(&app, &watched) >= 2);
    assert_eq!(polls(&app, &other), 0, "the unwatched VM was asked");
}
