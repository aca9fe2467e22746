//! `vm_metrics_update`: every `[events] metrics_interval_ms`, the
//! figures of each VM that has a subscriber in its `/ws/vm/{vm_id}` room
//! who may see them ([`EventBus::watched_vms`]) — and of no other VM: an
//! unwatched VM is never asked — at most `vm_metrics_max_vms_per_round`
//! per round, each call on its hypervisor's LOW lane.
//!
//! The figures are the backends' own counters ([`VmCounters`]): QEMU's
//! vCPU threads' CPU time, its process's memory and its taps' byte
//! counters, vSphere's `summary.quickStats` and PerformanceManager network
//! rates. A CPU share from cumulative time needs two
//! samples, so the first update of a VM has no `cpu_usage_percent`; a
//! figure a backend cannot give is left out, never invented.
//!
//! Runs on the control plane's runtime; depends on the fleet and the event
//! bus, never on the data plane.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;

use super::backend::Backend;
use super::fleet::Fleet;
use super::model::{HvResult, HypervisorError};
use super::queue::Lane;
use crate::events::protocol::{EventKind, MemorySource, VmMetricsData};
use crate::events::{Event, EventBus};

/// Where the poll of one VM is logged (debug), so tests and operators can
/// count the calls.
pub const LOG_TARGET: &str = "consolegate::vm_metrics";
const BYTES_PER_MIB: u64 = 1024 * 1024;

/// A VM's figures as its hypervisor counts them; `None`: not known.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmCounters {
    /// CPU time its vCPUs used since they started, in ns (cumulative).
    pub cpu_time_ns: Option<u64>,
    /// How many vCPUs the CPU time is spread over.
    pub vcpus: Option<u32>,
    /// CPU used now, in percent of what the VM may use (a backend that
    /// gives a rate rather than a cumulative time).
    pub cpu_usage_percent: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    /// The VM's configured memory.
    pub memory_size_bytes: Option<u64>,
    /// The whole `memory_used_bytes` is a share of, when it is not the
    /// configured size (a guest's own total, which leaves out what its
    /// firmware and kernel keep).
    pub memory_total_bytes: Option<u64>,
    /// Where `memory_used_bytes` comes from.
    pub memory_source: Option<MemorySource>,
    /// Bytes the guest received / sent since its NICs started
    /// (cumulative; QEMU: its taps' counters).
    pub network_rx_bytes: Option<u64>,
    pub network_tx_bytes: Option<u64>,
    /// Bytes per second the guest received / sent (a backend that gives
    /// averaged rates, not cumulative counts: vSphere).
    pub network_rx_bytes_per_s: Option<u64>,
    pub network_tx_bytes_per_s: Option<u64>,
}

/// `[events] vm_metrics_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsSettings {
    /// 0: never.
    pub interval_ms: u64,
    pub max_vms_per_round: usize,
}

impl Backend {
    /// One VM's figures (`vm` is the backend's native id).
    pub async fn counters(&self, vm: &str) -> HvResult<VmCounters> {
        match self {
            Backend::Qemu(b) => b.counters(vm).await,
            Backend::Vsphere(b) => b.counters(vm).await,
            Backend::Static(_) => Err(HypervisorError::Unsupported(
                "static VNC targets have no counters".into(),
            )),
        }
    }
}

/// The previous CPU sample of a VM: when, and its cumulative time.
type CpuSample = (Instant, u64);

/// Sends `vm_metrics_update` until the runtime ends.
pub async fn run(fleet: Arc<Fleet>, bus: EventBus, settings: MetricsSettings) {
    if settings.interval_ms == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(settings.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Bounded by the watched VMs: entries of VMs no longer watched go.
    let mut previous: HashMap<String, CpuSample> = HashMap::new();
    loop {
        tick.tick().await;
        let watched = bus.watched_vms(EventKind::VmMetricsUpdate, settings.max_vms_per_round);
        previous.retain(|vm, _| watched.contains(vm));
        let fetches = watched.iter().map(|vm| fetch(&fleet, vm));
        let results = join_all(fetches).await;
        for (vm, result) in watched.iter().zip(results) {
            match result {
                Ok((server, counters)) => {
                    let now = Instant::now();
                    let data = metrics_data(vm, &server, &counters, previous.get(vm), now);
                    if let Some(cpu) = counters.cpu_time_ns {
                        previous.insert(vm.clone(), (now, cpu));
                    }
                    bus.publish(&Event::vm_metrics(&data));
                }
                Err(e) => {
                    tracing::debug!(target: LOG_TARGET, vm_id = %vm, code = e.code(), "no figures: {e}");
                }
            }
        }
    }
}

/// One VM's counters, on its hypervisor's LOW lane; with its hypervisor.
async fn fetch(fleet: &Fleet, vm: &str) -> HvResult<(String, VmCounters)> {
    let found = fleet.resolve(vm, Lane::Low).await?;
    let member = fleet.member(&found).clone();
    tracing::debug!(target: LOG_TARGET, vm_id = %found.id, "vm metrics polled");
    let counters = member
        .queue
        .run(Lane::Low, member.backend.counters(&found.native))
        .await?;
    Ok((member.id.clone(), counters))
}

/// The event's data: shares where the whole is known, the CPU share from
/// the previous sample of a cumulative time.
fn metrics_data(
    vm: &str,
    server: &str,
    counters: &VmCounters,
    previous: Option<&CpuSample>,
    now: Instant,
) -> VmMetricsData {
    let cpu_from_time = match (previous, counters.cpu_time_ns, counters.vcpus) {
        (Some((then, before)), Some(cpu), Some(vcpus)) if vcpus > 0 && cpu >= *before => {
            let elapsed_ns = now.saturating_duration_since(*then).as_nanos() as f64;
            let share = (cpu - before) as f64 * 100.0 / (elapsed_ns * f64::from(vcpus));
            (elapsed_ns > 0.0).then_some(share)
        }
        _ => None,
    };
    let whole = counters.memory_total_bytes.or(counters.memory_size_bytes);
    let memory_usage_percent = match (counters.memory_used_bytes, whole) {
        (Some(used), Some(size)) if size > 0 => Some(round2(used as f64 * 100.0 / size as f64)),
        _ => None,
    };
    VmMetricsData {
        vm_id: vm.to_string(),
        server_id: server.to_string(),
        cpu_usage_percent: counters.cpu_usage_percent.or(cpu_from_time).map(round2),
        cpu_time_ns: counters.cpu_time_ns,
        memory_usage_percent,
        memory_used_mb: counters.memory_used_bytes.map(|b| b / BYTES_PER_MIB),
        memory_source: counters.memory_used_bytes.and(counters.memory_source),
        memory_size_mb: counters.memory_size_bytes.map(|b| b / BYTES_PER_MIB),
        network_rx_bytes: counters.network_rx_bytes,
        network_tx_bytes: counters.network_tx_bytes,
        network_rx_bytes_per_s: counters.network_rx_bytes_per_s,
        network_tx_bytes_per_s: counters.network_tx_bytes_per_s,
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_from_two_samples_and_known_wholes_only() {
        let now = Instant::now();
        let counters = VmCounters {
            cpu_time_ns: Some(3_000_000_000),
            vcpus: Some(2),
            memory_used_bytes: Some(64 * BYTES_PER_MIB),
            memory_size_bytes: Some(256 * BYTES_PER_MIB),
            ..VmCounters::default()
        };
        let first = metrics_data("kvm:a", "kvm", &counters, None, now);
        assert_eq!(first.cpu_usage_percent, None, "one sample is no rate");
        assert_eq!(first.memory_usage_percent, Some(25.0));
        assert_eq!(
            (first.memory_used_mb, first.memory_size_mb),
            (Some(64), Some(256))
        );
        assert_eq!(first.network_rx_bytes, None);
        // 1 s of CPU over 1 s on 2 vCPUs: 50 %.
        let then = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        let second = metrics_data("kvm:a", "kvm", &counters, Some(&(then, 2_000_000_000)), now);
        let cpu = second.cpu_usage_percent.unwrap();
        assert!((cpu - 50.0).abs() < 0.5, "{cpu}");
        // A counter that went back (a restarted QEMU) gives no rate.
        let back = metrics_data("kvm:a", "kvm", &counters, Some(&(then, 9_000_000_000)), now);
        assert_eq!(back.cpu_usage_percent, None);
        let json = serde_json::to_value(&back).unwrap();
        assert!(json.get("network_rx_bytes").is_none(), "{json}");
        assert_eq!(json["cpu_time_ns"], 3_000_000_000u64);
        assert!(json.get("memory_source").is_none(), "{json}");
        // A guest's own figure is a share of the guest's own total.
        let guest = VmCounters {
            memory_used_bytes: Some(96 * BYTES_PER_MIB),
            memory_size_bytes: Some(256 * BYTES_PER_MIB),
            memory_total_bytes: Some(192 * BYTES_PER_MIB),
            memory_source: Some(MemorySource::Balloon),
            ..VmCounters::default()
        };
        let data = metrics_data("kvm:a", "kvm", &guest, None, now);
        assert_eq!(data.memory_usage_percent, Some(50.0));
        let json = serde_json::to_value(&data).unwrap();
        assert_eq!(json["memory_source"], "balloon", "{json}");
        assert_eq!(json["memory_size_mb"], 256, "{json}");
        // No figure, no source.
        let none = VmCounters {
            memory_source: Some(MemorySource::Process),
            ..VmCounters::default()
        };
        assert_eq!(
            metrics_data("kvm:a", "kvm", &none, None, now).memory_source,
            None
        );
    }
}
