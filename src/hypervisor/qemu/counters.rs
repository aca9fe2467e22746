//! A QEMU VM's figures for `vm_metrics_update`, from real counters:
//!
//! - CPU: `query-cpus-fast` names each vCPU's host thread; the time each
//!   thread ran is the first field of `/proc/<thread>/schedstat` (ns).
//!   (`query-stats` is empty under TCG and has no CPU time.)
//! - Memory: `query-memory-size-summary`'s `base-memory` is the guest's
//!   size; in use is the QEMU process's resident memory (`VmRSS` of
//!   `/proc/<thread>/status`, which is the whole process's), what the VM
//!   costs the host. QEMU's own overhead counts in it.
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

use serde_json::Value;

use super::backend::Vm;
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
/// (one `status` for the process) and two sysfs reads per tap.
pub(super) async fn counters(vm: &Vm) -> HvResult<VmCounters> {
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
    let memory_used_bytes = match threads.first() {
        Some(thread) => rss_bytes(&read_proc(*thread, "status")?),
        None => None,
    };
    let network = network_bytes(vm).await;
    Ok(VmCounters {
        cpu_time_ns: (!threads.is_empty()).then_some(cpu_time_ns),
        vcpus: u32::try_from(threads.len()).ok().filter(|n| *n > 0),
        memory_used_bytes,
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
