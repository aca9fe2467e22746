//! A QEMU VM's figures for `vm_metrics_update`, from real counters:
//!
//! - CPU: `query-cpus-fast` names each vCPU's host thread; the time each
//!   thread ran is the first field of `/proc/<thread>/schedstat` (ns).
//!   (`query-stats` is empty under TCG and has no CPU time.)
//! - Memory: `query-memory-size-summary`'s `base-memory` is the guest's
//!   size; in use is the QEMU process's resident memory (`VmRSS` of
//!   `/proc/<thread>/status`, which is the whole process's), what the VM
//!   costs the host. QEMU's own overhead counts in it.
//! - Network: left out. QMP names no counter of a NIC's traffic, and a
//!   tap device's statistics are not read yet.
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

/// The VM's counters: two QMP commands and two small /proc reads per vCPU
/// (one `status` for the process).
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
    Ok(VmCounters {
        cpu_time_ns: (!threads.is_empty()).then_some(cpu_time_ns),
        vcpus: u32::try_from(threads.len()).ok().filter(|n| *n > 0),
        memory_used_bytes,
        memory_size_bytes: Some(base_memory(&memory)?),
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
