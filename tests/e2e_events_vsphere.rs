//! vSphere changes reach event subscribers through the PropertyCollector
//! (`WaitForUpdatesEx`), end to end: a real appliance (`consolegate run`)
//! follows govmomi's simulator; the test changes a VM's power state on the
//! simulator directly, through the vSphere API on an API session of its
//! own (never through the appliance), and a `/ws/vm/{id}` and a
//! `/ws/monitor` subscriber must see it long before the VM-list refresh
//! (set to 10 minutes, so only WaitForUpdatesEx can deliver it in time).
//! Then every API session is expired on the simulator: the appliance must
//! log in again, create a new filter, and keep reporting.
//!
//! Needs Debian's golang-go and golang-github-vmware-govmomi-dev (`make
//! test` installs them). Every wait is a bounded poll.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::events::{events, EventsClient};
use common::vcsim::{Vcsim, VcsimOptions, USERNAME};
use common::*;
use consolegate::hypervisor::model::{Hypervisor, PowerAction};
use consolegate::hypervisor::vsphere::{VsphereBackend, VsphereConfig};
use serde_json::Value;

const IO: &str = "epoll";
/// The VM-list refresh: far beyond any wait here, so it cannot be what
/// reports a change.
const REFRESH_INTERVAL_MS: u64 = 600_000;
/// How long a change may take to reach a subscriber ("well before the
/// refresh"): the simulator batches updates every 250 ms.
const EVENT_DEADLINE: Duration = Duration::from_secs(10);
/// `updates_max_wait_s` of the appliance: short, so a lost session is
/// noticed within seconds.
const WAIT_S: u64 = 2;
/// How long following may take to (re)start.
const FOLLOW_DEADLINE: Duration = Duration::from_secs(20);
const VM_NAME: &str = "DC0_H0_VM0";

fn vsphere_appliance(sim: &Vcsim) -> Appliance {
    set_current_io(IO);
    let extra_toml = format!(
        "\n[events]\nvm_refresh_interval_ms = {REFRESH_INTERVAL_MS}\nmetrics_interval_ms = 0\n\n\
         [[hypervisors]]\nkind = \"vsphere\"\nid = \"esx1\"\nurl = {:?}\nusername = {USERNAME:?}\n\
         password_file = {:?}\nthumbprint = {:?}\npool_size = 2\nacquire_timeout_ms = 5000\n\
         request_timeout_ms = 10000\nupdates_max_wait_s = {WAIT_S}\nupdates_reconnect_max_ms = 1000\n\n\
         [cache]\nvm_list_ttl_ms = {REFRESH_INTERVAL_MS}\n",
        sim.url,
        sim.password_file().display().to_string(),
        sim.thumbprint
    );
    Appliance::start(
        IO,
        ApplianceOptions {
            extra_toml,
            ..ApplianceOptions::default()
        },
    )
}

/// The test's own vSphere client of the simulator: its own API session,
/// its own runtime; what it does happens "on the host".
struct Host {
    runtime: tokio::runtime::Runtime,
    backend: VsphereBackend,
}

impl Host {
    fn new(sim: &Vcsim) -> Host {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut config = VsphereConfig::new("host", &sim.url, USERNAME, &sim.password_file());
        config.thumbprint = Some(sim.thumbprint.clone());
        config.follow_updates = false;
        config.request_timeout_ms = 10_000;
        config.task_timeout_ms = 20_000;
        let backend = {
            let _entered = runtime.enter();
            VsphereBackend::new(&config).expect("the test's vSphere client")
        };
        Host { runtime, backend }
    }

    fn native_id(&self, name: &str) -> String {
        let vms = self
            .runtime
            .block_on(self.backend.list_vms())
            .expect("list");
        vms.into_iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no VM {name} on the simulator"))
            .native_id
    }

    fn power(&self, vm: &str, action: PowerAction) {
        self.runtime
            .block_on(self.backend.power(vm, action, Box::new(|_| {})))
            .unwrap_or_else(|e| panic!("{action:?} {vm} on the simulator: {e}"));
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.runtime.block_on(self.backend.shutdown());
    }
}

/// How many times the appliance's log says it read the whole inventory
/// through a new filter.
fn inventory_reads(app: &Appliance) -> usize {
    std::fs::read_to_string(app.dir().join("stderr.log"))
        .unwrap_or_default()
        .matches("following vSphere updates (WaitForUpdatesEx): inventory read")
        .count()
}

fn wait_inventory_reads(app: &Appliance, at_least: usize) {
    wait_until(
        FOLLOW_DEADLINE,
        "the appliance following vSphere updates",
        || (inventory_reads(app) >= at_least).then_some(()),
    );
}

fn status_change(events: &mut EventsClient, vm_id: &str, old: &str, new: &str) -> Value {
    let change = events.next_where_within("vm_status_changed", EVENT_DEADLINE, |d| {
        d["vm_id"] == vm_id && d["old_status"] == old && d["new_status"] == new
    });
    assert_eq!(change["data"]["server_id"], "esx1", "{change}");
    change
}

#[test]
fn a_power_change_on_the_host_reaches_subscribers_through_wait_for_updates() {
    let sim = Vcsim::start(VcsimOptions::default());
    let host = Host::new(&sim);
    let native = host.native_id(VM_NAME);
    let vm_id = format!("esx1:{native}");
    let app = vsphere_appliance(&sim);
    wait_inventory_reads(&app, 1);
    let listed = app.get_json(&format!("/api/v1/vms/{vm_id}"));
    assert_eq!(listed["power"], "on", "{listed}");
    let mut room = events(app.control, &format!("/ws/vm/{vm_id}"), Some(ADMIN_TOKEN));
    let mut monitor = events(app.control, "/ws/monitor", Some(READ_TOKEN));

    let started = Instant::now();
    host.power(&native, PowerAction::Off);
    for events in [&mut room, &mut monitor] {
        let change = status_change(events, &vm_id, "on", "off");
        assert_eq!(change["data"]["vm_name"], VM_NAME, "{change}");
    }
    let took = started.elapsed();
    assert!(
        took < EVENT_DEADLINE,
        "the change took {took:?}; the refresh is {REFRESH_INTERVAL_MS} ms away"
    );
    // The change also dropped the cached list (its TTL is 10 minutes).
    let listed = app.get_json(&format!("/api/v1/vms/{vm_id}"));
    assert_eq!(listed["power"], "off", "{listed}");

    host.power(&native, PowerAction::On);
    status_change(&mut room, &vm_id, "off", "on");
    status_change(&mut monitor, &vm_id, "off", "on");
    // Reported once: no second copy of either change reaches the room.
    let copies = room.all_of("vm_status_changed", Duration::from_millis(1500));
    assert!(copies.is_empty(), "reported twice: {copies:?}");
    // The follower's figures: in GET /api/v1/hypervisors and /metrics.
    let all = app.get_json("/api/v1/hypervisors");
    let updates = all["hypervisors"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["id"] == "esx1"))
        .map(|h| h["updates"].clone())
        .unwrap_or_else(|| panic!("no esx1 in {all}"));
    assert_eq!(updates["following"], true, "{updates}");
    assert_eq!(updates["session"]["pool_size"], 1, "{updates}");
    assert!(
        updates["session"]["logins"].as_u64() >= Some(1),
        "{updates}"
    );
    assert!(
        updates["changes_reported"].as_u64() >= Some(2),
        "off and on: {updates}"
    );
    assert!(updates["updates_received"].as_u64() >= Some(3), "{updates}");
    assert!(
        updates["last_update_unix_ms"].as_u64().is_some(),
        "{updates}"
    );
    let metrics = app.get("/metrics").body;
    for line in [
        "consolegate_vsphere_updates_following{hypervisor=\"esx1\"} 1",
        "consolegate_vsphere_updates_errors_total{hypervisor=\"esx1\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in /metrics"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("consolegate_vsphere_updates_received_total{hypervisor=\"esx1\"} ")),
        "no updates_received in /metrics"
    );
    eprintln!(
        "vSphere power change to subscribers in {:.0} ms (load {})",
        took.as_secs_f64() * 1000.0,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}

#[test]
fn a_lost_session_is_re_established_and_changes_keep_coming() {
    let sim = Vcsim::start(VcsimOptions::default());
    let host = Host::new(&sim);
    let native = host.native_id(VM_NAME);
    let vm_id = format!("esx1:{native}");
    let app = vsphere_appliance(&sim);
    wait_inventory_reads(&app, 1);
    let mut room = events(app.control, &format!("/ws/vm/{vm_id}"), Some(ADMIN_TOKEN));

    let logins = sim.stats().logins;
    let expired = sim.expire_sessions();
    assert!(
        expired >= 2,
        "the host's and the follower's sessions: {expired}"
    );
    // The follower's wait ends within WAIT_S, meets NotAuthenticated, logs
    // in again and reads the inventory through a new filter.
    wait_inventory_reads(&app, 2);
    let after = sim.stats();
    assert!(
        after.logins > logins,
        "a new login: {logins} before, {after:?}"
    );

    host.power(&native, PowerAction::Suspend);
    status_change(&mut room, &vm_id, "on", "suspended");
    host.power(&native, PowerAction::On);
    status_change(&mut room, &vm_id, "suspended", "on");
}
