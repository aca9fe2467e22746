//! A QEMU VM's figures for `vm_metrics_update`, from real counters:
//!
//! - CPU: `query-cpus-fast` names each vCPU's host thread; the time each
//!   thread ran is the first field of `/proc/<thread>/schedstat` (ns).
//!   (`query-stats` is empty under TCG and has no CPU time.)
//! - Memory: `query-memory-size-summary`'s `base-memory` is the guest's
//!   size. In use is the guest's own figure when its virtio-balloon driver
//!   reports statistics: total less available memory (less free memory
//!   and disk caches for a guest that has no "available" figure), of its
//!   total. A VM with a balloon device (found by type under
//!   `/machine/peripheral` and `/machine/peripheral-anon` with `qom-list`,
//!   once per QMP connection) gets its statistics polling turned on when
//!   it is off (`qom-set guest-stats-polling-interval`,
//!   `balloon_stats_polling_interval_s`); `qom-get guest-stats` then reads
//!   them. Statistics never reported (`last-update` 0: no guest driver),
//!   older than three polling intervals (a paused guest, a driver gone) or
//!   without a total are not used. Otherwise, in use is the QEMU process's
//!   resident memory (`VmRSS` of `/proc/<thread>/status`, which is the
//!   whole process's), what the VM costs the host, QEMU's own overhead
//!   included. `memory_source` says which.
//! - Network: the VM's tap devices' byte counters,
//!   `/sys/class/net/<ifname>/statistics/{rx,tx}_bytes`, summed over its
//!   taps. QMP has no NIC counter and QEMU 7.2 no structured command that
//!   names a tap's interface (`query-rx-filter` names the NIC, `qom-get`
//!   its netdev's id), so the names come from HMP's `info network`
//!   through `human-monitor-command` (`… type=tap,ifname=NAME,…`). A tap's
//!   counters are the host's side: what the host receives from the tap
//!   is what the guest sent, so the guest's `network_tx_bytes` is the
//!   tap's `rx_bytes` and its `network_rx_bytes` the tap's `tx_bytes`. A
//!   VM without a named tap (user-mode networking, a tap passed as a file
//!   descriptor) has no network figures; traffic of its other netdevs is
//!   not in them.
//!
//! It needs QEMU on the appliance's host (QMP is a local socket anyway).
//! Every /proc read is bounded; a QMP answer that is not the expected
//! shape is a `Protocol` error, never a panic.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::backend::Vm;
use super::qmp::QmpError;
use crate::events::protocol::MemorySource;
use crate::hypervisor::metrics::VmCounters;
use crate::hypervisor::model::{HvResult, HypervisorError};

/// Most vCPUs read per VM (QEMU's x86 maximum is 1024 / 4096 with x2apic;
/// beyond this the answer is refused as implausible).
pub const MAX_VCPUS: usize = 4096;
/// Largest /proc file read, in bytes (`status` is ~1.5 KiB).
pub const MAX_PROC_FILE_BYTES: u64 = 16 * 1024;
/// Largest sysfs counter file read, in bytes (a u64 and a newline).
pub const MAX_SYSFS_COUNTER_BYTES: u64 = 64;
/// Taps read per VM at most (QEMU allows far fewer NICs on one bus).
pub const MAX_TAPS_PER_VM: usize = 64;
/// Longest Linux interface name, in bytes (`IFNAMSIZ` less its NUL).
pub const MAX_IFNAME_BYTES: usize = 15;
/// Where the kernel shows an interface's counters.
const SYSFS_NET: &str = "/sys/class/net";
/// Where QOM keeps the devices of `-device` (with an `id=`, and without).
pub const DEVICE_CONTAINERS: [&str; 2] = ["/machine/peripheral", "/machine/peripheral-anon"];
/// The QOM child type of a balloon device: `child<virtio-balloon-pci>`,
/// `…-pci-transitional`, `…-pci-non-transitional`, `…-ccw`, `…-device`.
const BALLOON_CHILD_PREFIX: &str = "child<virtio-balloon-";
/// Entries of one `qom-list` answer looked at, at most.
pub const MAX_QOM_ENTRIES: usize = 4096;
/// A statistic the guest does not give is -1, which QEMU shows as a u64.
const STAT_UNKNOWN: u64 = u64::MAX;
/// Statistics older than this many polling intervals are not used.
pub const BALLOON_STATS_MAX_AGE_INTERVALS: u64 = 3;

/// What was found of a VM's balloon device on one QMP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BalloonProbe {
    /// The connection it holds for ([`super::state::VmState::attempts`]).
    attempts: u64,
    /// The device's QOM path; None: no balloon device.
    path: Option<String>,
    /// Its statistics polling interval, in seconds (0: off).
    interval_s: u64,
}

fn protocol(message: String) -> HypervisorError {
    HypervisorError::Protocol(message)
}

/// The vCPU threads' ids of a `query-cpus-fast` answer.
pub fn thread_ids(answer: &Value) -> HvResult<Vec<u32>> {
    let cpus = answer
        .as_array()
        .ok_or_else(|| protocol("query-cpus-fast did not answer a list".into()))?;
    if cpus.len() > MAX_VCPUS {
        return Err(protocol(format!(
            "query-cpus-fast lists {} vCPUs (most: {MAX_VCPUS})",
            cpus.len()
        )));
    }
    cpus.iter()
        .map(|cpu| {
            cpu.get("thread-id")
                .and_then(Value::as_u64)
                .filter(|id| *id > 0)
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| protocol(format!("a vCPU without a thread id: {cpu}")))
        })
        .collect()
}

/// `base-memory` of a `query-memory-size-summary` answer, in bytes.
pub fn base_memory(answer: &Value) -> HvResult<u64> {
    answer
        .get("base-memory")
        .and_then(Value::as_u64)
        .ok_or_else(|| protocol("query-memory-size-summary has no base-memory".into()))
}

/// The CPU time of `/proc/<id>/schedstat`'s text, in ns.
pub fn schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `VmRSS` of `/proc/<id>/status`'s text, in bytes.
pub fn rss_bytes(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Whether `name` can be a Linux interface name and is safe in a sysfs
/// path (no `/`, not `.` or `..`, no spaces or control characters).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_BYTES
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':' && b != b',')
}

/// The tap interfaces of HMP's `info network` text, in order, each once:
/// the `ifname=` of every netdev line with `type=tap`. Names that cannot
/// be interfaces are refused (the text is QEMU's, but it goes into a
/// path).
pub fn tap_ifnames(info_network: &str) -> HvResult<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for line in info_network.lines() {
        let fields: Vec<&str> = line
            .split(|c: char| c == ',' || c.is_whitespace())
            .collect();
        if !fields.contains(&"type=tap") {
            continue;
        }
        let Some(name) = fields.iter().find_map(|f| f.strip_prefix("ifname=")) else {
            continue;
        };
        if !valid_ifname(name) {
            return Err(protocol(format!(
                "info network names a tap {name:?} that is no interface name"
            )));
        }
        if !names.iter().any(|n| n == name) {
            if names.len() >= MAX_TAPS_PER_VM {
                return Err(protocol(format!(
                    "info network names more than {MAX_TAPS_PER_VM} taps"
                )));
            }
            names.push(name.to_string());
        }
    }
    Ok(names)
}

/// A sysfs counter file's text, as a number.
pub fn sysfs_counter(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// One counter of an interface: `rx_bytes` or `tx_bytes` (the host's side).
fn read_interface_counter(ifname: &str, counter: &str) -> HvResult<u64> {
    let path = format!("{SYSFS_NET}/{ifname}/statistics/{counter}");
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_SYSFS_COUNTER_BYTES).read_to_string(&mut text))
        .map_err(|e| HypervisorError::Unreachable(format!("{path} (a tap of the VM): {e}")))?;
    sysfs_counter(&text).ok_or_else(|| protocol(format!("{path} is not a count: {text:?}")))
}

/// The guest's bytes (received, sent) over these taps: a tap's `tx_bytes`
/// went to the guest, its `rx_bytes` came from it.
pub fn guest_bytes_of_taps(ifnames: &[String]) -> HvResult<(u64, u64)> {
    let mut received = 0u64;
    let mut sent = 0u64;
    for ifname in ifnames {
        received = received.saturating_add(read_interface_counter(ifname, "tx_bytes")?);
        sent = sent.saturating_add(read_interface_counter(ifname, "rx_bytes")?);
    }
    Ok((received, sent))
}

/// The VM's taps, named by QEMU.
async fn taps(vm: &Vm) -> HvResult<Vec<String>> {
    let arguments = serde_json::json!({"command-line": "info network"});
    let answer = vm
        .client
        .execute("human-monitor-command", Some(arguments))
        .await?;
    let text = answer
        .as_str()
        .ok_or_else(|| protocol("human-monitor-command did not answer text".into()))?;
    tap_ifnames(text)
}

/// The guest's (received, sent) bytes over its taps; None without a tap,
/// or when they cannot be read (then the CPU and memory figures still go
/// out, and the reason is logged at debug level).
async fn network_bytes(vm: &Vm) -> Option<(u64, u64)> {
    let taps = match taps(vm).await {
        Ok(taps) if !taps.is_empty() => taps,
        Ok(_) => return None,
        Err(e) => {
            tracing::debug!(target: crate::hypervisor::metrics::LOG_TARGET, "no tap names: {e}");
            return None;
        }
    };
    guest_bytes_of_taps(&taps)
        .map_err(|e| {
            tracing::debug!(target: crate::hypervisor::metrics::LOG_TARGET, "no tap counters: {e}");
        })
        .ok()
}

/// The QOM path of the balloon device in `container`'s `qom-list`
/// answer, if it holds one.
pub fn balloon_path(container: &str, answer: &Value) -> HvResult<Option<String>> {
    let entries = answer
        .as_array()
        .ok_or_else(|| protocol(format!("qom-list {container} did not answer a list")))?;
    if entries.len() > MAX_QOM_ENTRIES {
        return Err(protocol(format!(
            "qom-list {container} lists {} entries (most: {MAX_QOM_ENTRIES})",
            entries.len()
        )));
    }
    Ok(entries.iter().find_map(|entry| {
        let kind = entry.get("type")?.as_str()?;
        let name = entry.get("name")?.as_str()?;
        (kind.starts_with(BALLOON_CHILD_PREFIX) && !name.is_empty() && !name.contains('/'))
            .then(|| format!("{container}/{name}"))
    }))
}

/// A guest's memory as its balloon driver reports it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMemory {
    pub used_bytes: u64,
    pub total_bytes: u64,
}

/// The guest's memory from a `guest-stats` answer (`{"stats": {"stat-…":
/// bytes, …}, "last-update": seconds}`) read at `now_s` (seconds since
/// the epoch, as QEMU stamps it): total less available, or less free and
/// disk caches for a guest without the available figure. None when the
/// guest never reported (`last-update` 0), the report is older than
/// `max_age_s`, or the total or both remainders are unknown (-1).
pub fn guest_memory(answer: &Value, now_s: u64, max_age_s: u64) -> HvResult<Option<GuestMemory>> {
    let last_update = answer
        .get("last-update")
        .and_then(Value::as_u64)
        .ok_or_else(|| protocol(format!("guest-stats without last-update: {answer}")))?;
    let stats = answer
        .get("stats")
        .filter(|stats| stats.is_object())
        .ok_or_else(|| protocol(format!("guest-stats without stats: {answer}")))?;
    if last_update == 0 || now_s.saturating_sub(last_update) > max_age_s {
        return Ok(None);
    }
    let stat = |name: &str| {
        stats
            .get(name)
            .and_then(Value::as_u64)
            .filter(|value| *value != STAT_UNKNOWN)
    };
    let Some(total) = stat("stat-total-memory").filter(|total| *total > 0) else {
        return Ok(None);
    };
    let unused = match stat("stat-available-memory") {
        Some(available) => available,
        None => match stat("stat-free-memory") {
            Some(free) => free.saturating_add(stat("stat-disk-caches").unwrap_or(0)),
            None => return Ok(None),
        },
    };
    Ok(Some(GuestMemory {
        used_bytes: total.saturating_sub(unused),
        total_bytes: total,
    }))
}

/// Seconds since the epoch now, as QEMU stamps `last-update`.
fn epoch_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Finds the VM's balloon device and turns its statistics polling on when
/// it is off and `polling_interval_s` is not 0.
async fn probe_balloon(vm: &Vm, attempts: u64, polling_interval_s: u64) -> HvResult<BalloonProbe> {
    let mut path = None;
    for container in DEVICE_CONTAINERS {
        let listed = vm
            .client
            .execute("qom-list", Some(json!({"path": container})))
            .await;
        let answer = match listed {
            Ok(answer) => answer,
            // A machine without this container holds no device there.
            Err(QmpError::Command { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        path = balloon_path(container, &answer)?;
        if path.is_some() {
            break;
        }
    }
    let Some(device) = path else {
        return Ok(BalloonProbe {
            attempts,
            path: None,
            interval_s: 0,
        });
    };
    let property = |name: &str| json!({"path": device, "property": name});
    let current = vm
        .client
        .execute("qom-get", Some(property("guest-stats-polling-interval")))
        .await?
        .as_u64()
        .ok_or_else(|| protocol(format!("{device}'s polling interval is not a number")))?;
    let interval_s = if current == 0 && polling_interval_s > 0 {
        let mut set = property("guest-stats-polling-interval");
        set["value"] = json!(polling_interval_s);
        vm.client.execute("qom-set", Some(set)).await?;
        tracing::info!(vm = %vm.id, device = %device, interval_s = polling_interval_s,
            "balloon statistics polling turned on");
        polling_interval_s
    } else {
        current
    };
    Ok(BalloonProbe {
        attempts,
        path: Some(device),
        interval_s,
    })
}

/// The guest's memory from its balloon driver; None without a balloon
/// device, with polling off, or without fresh statistics. A failure is
/// logged at debug level and found again on the next call.
async fn balloon_memory(vm: &Vm, polling_interval_s: u64) -> Option<GuestMemory> {
    let attempts = vm.state().attempts;
    let cached = vm
        .balloon_probe()
        .filter(|probe| probe.attempts == attempts);
    let probe = match cached {
        Some(probe) => probe,
        None => match probe_balloon(vm, attempts, polling_interval_s).await {
            Ok(probe) => {
                vm.set_balloon_probe(Some(probe.clone()));
                probe
            }
            Err(e) => {
                tracing::debug!(target: crate::hypervisor::metrics::LOG_TARGET, vm = %vm.id,
                    "no balloon device found: {e}");
                return None;
            }
        },
    };
    let device = probe.path.filter(|_| probe.interval_s > 0)?;
    let arguments = json!({"path": device, "property": "guest-stats"});
    let read = match vm.client.execute("qom-get", Some(arguments)).await {
        Ok(answer) => {
            let max_age_s = probe
                .interval_s
                .saturating_mul(BALLOON_STATS_MAX_AGE_INTERVALS);
            guest_memory(&answer, epoch_seconds(), max_age_s)
        }
        Err(e) => {
            // The device may be gone (unplugged): look again next time.
            vm.set_balloon_probe(None);
            Err(e.into())
        }
    };
    read.map_err(|e| {
        tracing::debug!(target: crate::hypervisor::metrics::LOG_TARGET, vm = %vm.id,
            "no balloon statistics: {e}");
    })
    .ok()
    .flatten()
}

fn read_proc(thread: u32, file: &str) -> HvResult<String> {
    let path = format!("/proc/{thread}/{file}");
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_PROC_FILE_BYTES).read_to_string(&mut text))
        .map_err(|e| {
            HypervisorError::Unreachable(format!("{path} (a vCPU thread of QEMU): {e}"))
        })?;
    Ok(text)
}

/// The VM's counters: three QMP commands, two small /proc reads per vCPU
/// (one `status` for the process) and two sysfs reads per tap; with a
/// balloon device, one `qom-get` more (and on a connection's first call,
/// up to two `qom-list`, a `qom-get` and a `qom-set`).
pub(super) async fn counters(vm: &Vm, balloon_polling_interval_s: u64) -> HvResult<VmCounters> {
    let state = vm.state();
    if !state.connected {
        return Err(vm.unreachable(&state));
    }
    let cpus = vm.client.execute("query-cpus-fast", None).await?;
    let threads = thread_ids(&cpus)?;
    let memory = vm.client.execute("query-memory-size-summary", None).await?;
    let mut cpu_time_ns = 0u64;
    for thread in &threads {
        let text = read_proc(*thread, "schedstat")?;
        let ns = schedstat_ns(&text)
            .ok_or_else(|| protocol(format!("/proc/{thread}/schedstat is not a CPU time")))?;
        cpu_time_ns = cpu_time_ns.saturating_add(ns);
    }
    let (memory_used_bytes, memory_total_bytes, memory_source) =
        match balloon_memory(vm, balloon_polling_interval_s).await {
            Some(guest) => (
                Some(guest.used_bytes),
                Some(guest.total_bytes),
                MemorySource::Balloon,
            ),
            None => {
                let rss = match threads.first() {
                    Some(thread) => rss_bytes(&read_proc(*thread, "status")?),
                    None => None,
                };
                (rss, None, MemorySource::Process)
            }
        };
    let network = network_bytes(vm).await;
    Ok(VmCounters {
        cpu_time_ns: (!threads.is_empty()).then_some(cpu_time_ns),
        vcpus: u32::try_from(threads.len()).ok().filter(|n| *n > 0),
        memory_used_bytes,
        memory_total_bytes,
        memory_source: Some(memory_source),
        memory_size_bytes: Some(base_memory(&memory)?),
        network_rx_bytes: network.map(|(received, _)| received),
        network_tx_bytes: network.map(|(_, sent)| sent),
        ..VmCounters::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_read_and_odd_ones_refused() {
        let cpus = json!([
            {"cpu-index": 0, "thread-id": 4242, "qom-path": "/machine/unattached/device[0]"},
            {"cpu-index": 1, "thread-id": 4243}
        ]);
        assert_eq!(thread_ids(&cpus).unwrap(), vec![4242, 4243]);
        assert!(thread_ids(&json!({"nope": 1})).is_err());
        assert!(thread_ids(&json!([{"cpu-index": 0}])).is_err());
        assert!(thread_ids(&json!([{"thread-id": -4}])).is_err());
        assert!(thread_ids(&json!([{"thread-id": 0}])).is_err());
        assert_eq!(
            base_memory(&json!({"base-memory": 134217728})).unwrap(),
            128 << 20
        );
        assert!(base_memory(&json!({})).is_err());
        assert_eq!(schedstat_ns("1234567 890 12\n"), Some(1_234_567));
        assert_eq!(schedstat_ns(""), None);
        let status = "Name:\tqemu\nVmPeak:\t 9 kB\nVmRSS:\t   40960 kB\nThreads: 4\n";
        assert_eq!(rss_bytes(status), Some(40 << 20));
        assert_eq!(rss_bytes("Name: x\n"), None);
    }

    /// `info network` of QEMU 7.2 with a tap, a user-mode netdev and a
    /// tap passed as a file descriptor, as it answered here.
    const INFO_NETWORK: &str = "nic0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\r\n \\ n0: index=0,type=tap,ifname=cgtap90,script=no,downscript=no\r\ne1000.1: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:57\r\n \\ u0: index=0,type=user,net=10.0.2.0,restrict=off\r\nnic2: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:58\r\n \\ n2: index=0,type=tap,fd=33\r\n";

    #[test]
    fn taps_are_read_from_info_network_and_odd_names_refused() {
        assert_eq!(tap_ifnames(INFO_NETWORK).unwrap(), vec!["cgtap90"]);
        let user_only = "e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\r\n \\ u0: index=0,type=user,net=10.0.2.0,restrict=off\r\n";
        assert!(tap_ifnames(user_only).unwrap().is_empty());
        assert!(tap_ifnames("").unwrap().is_empty());
        // Two queues of one tap, and two taps: each name once, in order.
        let two = " \\ a: index=0,type=tap,ifname=tapA\r\n \\ b: index=1,type=tap,ifname=tapA\r\n \\ c: index=0,type=tap,ifname=tapB\r\n";
        assert_eq!(tap_ifnames(two).unwrap(), vec!["tapA", "tapB"]);
        for bad in [
            "..",
            ".",
            "a/../../etc",
            "averyveryverylongname",
            "t\u{7f}x",
        ] {
            let text = format!(" \\ n0: index=0,type=tap,ifname={bad},script=no\r\n");
            assert!(tap_ifnames(&text).is_err(), "{bad:?} accepted");
        }
        let many: String = (0..=MAX_TAPS_PER_VM)
            .map(|i| format!(" \\ n{i}: index=0,type=tap,ifname=t{i}\r\n"))
            .collect();
        assert!(tap_ifnames(&many).is_err());
        assert_eq!(sysfs_counter("123456\n"), Some(123_456));
        assert_eq!(sysfs_counter("x\n"), None);
        assert_eq!(sysfs_counter(""), None);
    }

    /// `qom-list` of QEMU 7.2 (Debian 12) started with
    /// `-device virtio-balloon-pci` (no id) and nothing else, as it
    /// answered here.
    #[test]
    fn the_balloon_device_is_found_by_its_type() {
        let named = json!([{"name": "type", "type": "string"}]);
        let anon = json!([
            {"name": "type", "type": "string"},
            {"name": "device[0]", "type": "child<virtio-balloon-pci>"}
        ]);
        assert_eq!(balloon_path("/machine/peripheral", &named).unwrap(), None);
        assert_eq!(
            balloon_path("/machine/peripheral-anon", &anon).unwrap(),
            Some("/machine/peripheral-anon/device[0]".to_string())
        );
        // Another transport, with an id; other devices are not balloons.
        let others = json!([
            {"name": "nic0", "type": "child<rtl8139>"},
            {"name": "balloon0", "type": "child<virtio-balloon-ccw>"}
        ]);
        assert_eq!(
            balloon_path("/machine/peripheral", &others).unwrap(),
            Some("/machine/peripheral/balloon0".to_string())
        );
        let no_balloon = json!([{"name": "vb", "type": "link<virtio-balloon-pci>"}]);
        assert_eq!(
            balloon_path("/machine/peripheral", &no_balloon).unwrap(),
            None
        );
        let odd_name = json!([{"name": "a/b", "type": "child<virtio-balloon-pci>"}]);
        assert_eq!(
            balloon_path("/machine/peripheral", &odd_name).unwrap(),
            None
        );
        assert!(balloon_path("/machine/peripheral", &json!({})).is_err());
        let many: Vec<Value> = (0..=MAX_QOM_ENTRIES)
            .map(|i| json!({"name": format!("d{i}"), "type": "child<pci-bridge>"}))
            .collect();
        assert!(balloon_path("/machine/peripheral", &Value::Array(many)).is_err());
    }

    /// Statistics as QEMU 7.2 holds them (`-1`, unknown, shows as
    /// u64::MAX; `last-update` in seconds since the epoch).
    fn stats(pairs: &[(&str, u64)], last_update: u64) -> Value {
        let names = [
            "stat-swap-in",
            "stat-swap-out",
            "stat-major-faults",
            "stat-minor-faults",
            "stat-free-memory",
            "stat-total-memory",
            "stat-available-memory",
            "stat-disk-caches",
            "stat-htlb-pgalloc",
            "stat-htlb-pgfail",
        ];
        let mut stats = serde_json::Map::new();
        for name in names {
            let value = pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(u64::MAX, |(_, v)| *v);
            stats.insert(name.to_string(), json!(value));
        }
        json!({"stats": stats, "last-update": last_update})
    }

    #[test]
    fn guest_memory_comes_from_fresh_reports_with_a_total() {
        const NOW: u64 = 1_796_000_000;
        const MIB: u64 = 1024 * 1024;
        // What QEMU 7.2 answered here for a guest with no balloon driver,
        // polling on or off: every statistic -1, never updated.
        let never = stats(&[], 0);
        assert_eq!(
            never["stats"]["stat-total-memory"],
            json!(18_446_744_073_709_551_615u64)
        );
        assert_eq!(guest_memory(&never, NOW, 15).unwrap(), None);
        // A Linux guest's report: total less available.
        let linux = stats(
            &[
                ("stat-total-memory", 1_000 * MIB),
                ("stat-free-memory", 300 * MIB),
                ("stat-available-memory", 600 * MIB),
                ("stat-disk-caches", 250 * MIB),
            ],
            NOW - 4,
        );
        assert_eq!(
            guest_memory(&linux, NOW, 15).unwrap(),
            Some(GuestMemory {
                used_bytes: 400 * MIB,
                total_bytes: 1_000 * MIB
            })
        );
        // Too old: a paused guest, a driver that stopped.
        assert_eq!(guest_memory(&linux, NOW + 20, 15).unwrap(), None);
        // A guest without "available" (older kernels, other OSes): less
        // free and disk caches, or free alone.
        let older = stats(
            &[
                ("stat-total-memory", 1_000 * MIB),
                ("stat-free-memory", 300 * MIB),
                ("stat-disk-caches", 250 * MIB),
            ],
            NOW,
        );
        assert_eq!(
            guest_memory(&older, NOW, 15).unwrap().unwrap().used_bytes,
            450 * MIB
        );
        let free_only = stats(
            &[
                ("stat-total-memory", 1_000 * MIB),
                ("stat-free-memory", 300 * MIB),
            ],
            NOW,
        );
        assert_eq!(
            guest_memory(&free_only, NOW, 15)
                .unwrap()
                .unwrap()
                .used_bytes,
            700 * MIB
        );
        // Without a total, or with nothing to take from it: nothing.
        let no_total = stats(&[("stat-free-memory", 300 * MIB)], NOW);
        assert_eq!(guest_memory(&no_total, NOW, 15).unwrap(), None);
        let no_rest = stats(&[("stat-total-memory", 1_000 * MIB)], NOW);
        assert_eq!(guest_memory(&no_rest, NOW, 15).unwrap(), None);
        // A report claiming more available than total is 0 used, not a wrap.
        let odd = stats(
            &[
                ("stat-total-memory", 100 * MIB),
                ("stat-available-memory", 200 * MIB),
            ],
            NOW,
        );
        assert_eq!(guest_memory(&odd, NOW, 15).unwrap().unwrap().used_bytes, 0);
        // Not the documented shape: an error, not a panic.
        assert!(guest_memory(&json!({"stats": {}}), NOW, 15).is_err());
        assert!(guest_memory(&json!({"last-update": 1}), NOW, 15).is_err());
        assert!(guest_memory(&json!("x"), NOW, 15).is_err());
    }

    #[test]
    fn the_loopback_interfaces_counters_read_from_sysfs() {
        // `lo` exists everywhere; a datagram through it counts both ways.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .send_to(b"count me", socket.local_addr().unwrap())
            .unwrap();
        let (received, sent) = guest_bytes_of_taps(&["lo".to_string()]).unwrap();
        assert!(received > 0 && sent > 0, "{received} {sent}");
        assert!(guest_bytes_of_taps(&["nosuchif0".to_string()]).is_err());
    }

    #[test]
    fn this_threads_own_counters_read_from_proc() {
        // The same files the backend reads, of a thread that surely exists.
        let me = std::process::id();
        let text = read_proc(me, "schedstat").unwrap();
        assert!(schedstat_ns(&text).is_some(), "{text}");
        assert!(rss_bytes(&read_proc(me, "status").unwrap()).unwrap() > 0);
        assert!(read_proc(u32::MAX, "schedstat").is_err());
    }
}
