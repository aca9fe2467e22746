//! A VM's network rates from vSphere's PerformanceManager: the real-time
//! (20 s) samples of `net.bytesRx` and `net.bytesTx` (rollup `average`,
//! unit KBps), summed over the VM's NICs (the instance `""`).
//!
//! vSphere gives these as averages over each 20-s sample, not as
//! cumulative counters, so they become `network_rx_bytes_per_s` /
//! `network_tx_bytes_per_s` (KB = 1 024 bytes) and the cumulative
//! `network_*_bytes` stay out. Counter ids differ between servers: they
//! are looked up once by name in `PerformanceManager.perfCounter`.
//!
//! Builds requests and reads answers only; the calls go through the
//! backend's session pool. Must not depend on the control plane.

use super::soap::{self, Element, MoRef, Request};
use crate::hypervisor::model::{HvResult, HypervisorError};

/// The real-time interval of hosts and VMs, in seconds.
pub const REALTIME_INTERVAL_S: u32 = 20;
/// Bytes in vSphere's KB (its `kiloBytesPerSecond`).
pub const BYTES_PER_KB: u64 = 1024;
/// Counters read at most from `perfCounter` (a vCenter has ~600).
pub const MAX_PERF_COUNTERS: usize = 100_000;

/// The ids of the two counters on this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetCounterIds {
    pub rx: i32,
    pub tx: i32,
}

/// A VM's network rates, in bytes per second (None: no sample).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetRates {
    pub rx_bytes_per_s: Option<u64>,
    pub tx_bytes_per_s: Option<u64>,
}

fn protocol(message: String) -> HypervisorError {
    HypervisorError::Protocol(message)
}

/// `RetrievePropertiesEx` of the PerformanceManager's `perfCounter`.
pub fn counters_request(collector: &MoRef, perf_manager: &MoRef) -> Vec<u8> {
    soap::retrieve_object(collector, perf_manager, &["perfCounter"])
}

/// The ids of `net.bytesRx` / `net.bytesTx` (rollup `average`) in the
/// `perfCounter` property's value (`ArrayOfPerfCounterInfo`). None when
/// the server has either not.
pub fn net_counter_ids(perf_counters: &Element) -> HvResult<Option<NetCounterIds>> {
    let infos: Vec<&Element> = perf_counters.children_named("PerfCounterInfo").collect();
    if infos.len() > MAX_PERF_COUNTERS {
        return Err(protocol(format!(
            "perfCounter lists {} counters (most: {MAX_PERF_COUNTERS})",
            infos.len()
        )));
    }
    let find = |name: &str| {
        infos.iter().find_map(|info| {
            let group = info.path(&["groupInfo", "key"])?.text.trim();
            let key = info.path(&["nameInfo", "key"])?.text.trim();
            let rollup = info.child_text("rollupType")?;
            (group == "net" && key == name && rollup == "average")
                .then(|| info.child_text("key")?.parse::<i32>().ok())
                .flatten()
        })
    };
    Ok(find("bytesRx")
        .zip(find("bytesTx"))
        .map(|(rx, tx)| NetCounterIds { rx, tx }))
}

/// `QueryPerf` of the latest real-time sample of both counters of `vm`,
/// summed over its NICs.
pub fn query_request(perf_manager: &MoRef, vm: &MoRef, ids: NetCounterIds) -> Vec<u8> {
    let mut r = Request::new("QueryPerf", perf_manager)
        .start("querySpec", None)
        .moref("entity", vm)
        .text("maxSample", "1");
    for id in [ids.rx, ids.tx] {
        r = r
            .start("metricId", None)
            .text("counterId", &id.to_string())
            .text("instance", "")
            .end("metricId");
    }
    r.text("intervalId", &REALTIME_INTERVAL_S.to_string())
        .end("querySpec")
        .finish()
}

/// An element's text as a number; what it is names it in the error.
fn number<T: std::str::FromStr>(element: &Element, what: &str) -> HvResult<T> {
    element
        .text
        .trim()
        .parse()
        .map_err(|_| protocol(format!("QueryPerf: {what} {:?}", element.text)))
}

/// The rates in a `QueryPerf` answer: the latest value of each counter's
/// series for the instance `""` (a negative value is vSphere's "no
/// data"). KBps become bytes per second.
pub fn rates(result: &Element, ids: NetCounterIds) -> HvResult<NetRates> {
    let mut rates = NetRates::default();
    for metric in result.children_named("returnval") {
        for series in metric.children_named("value") {
            let Some(id) = series.path(&["id", "counterId"]) else {
                continue;
            };
            let counter: i32 = number(id, "counterId")?;
            let instance = series
                .path(&["id", "instance"])
                .map_or("", |i| i.text.trim());
            if !instance.is_empty() {
                continue;
            }
            let Some(last) = series.children_named("value").last() else {
                continue;
            };
            let kbps: i64 = number(last, "value")?;
            let bytes = u64::try_from(kbps)
                .ok()
                .map(|k| k.saturating_mul(BYTES_PER_KB));
            if counter == ids.rx {
                rates.rx_bytes_per_s = bytes;
            } else if counter == ids.tx {
                rates.tx_bytes_per_s = bytes;
            }
        }
    }
    Ok(rates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(key: i32, group: &str, name: &str, rollup: &str) -> String {
        format!(
            "<PerfCounterInfo><key>{key}</key><nameInfo><label>x</label><key>{name}</key></nameInfo>\
             <groupInfo><key>{group}</key></groupInfo><unitInfo><key>kiloBytesPerSecond</key></unitInfo>\
             <rollupType>{rollup}</rollupType><statsType>rate</statsType></PerfCounterInfo>"
        )
    }

    fn parse(xml: &str) -> Element {
        soap::parse(xml.as_bytes()).unwrap()
    }

    #[test]
    fn counter_ids_are_found_by_group_name_and_rollup() {
        let xml = format!(
            "<val>{}{}{}{}{}</val>",
            info(2, "cpu", "usage", "average"),
            info(461, "net", "bytesRx", "maximum"),
            info(462, "net", "bytesRx", "average"),
            info(463, "net", "bytesTx", "average"),
            info(500, "disk", "bytesTx", "average"),
        );
        let ids = net_counter_ids(&parse(&xml)).unwrap();
        assert_eq!(ids, Some(NetCounterIds { rx: 462, tx: 463 }));
        let only_rx = format!("<val>{}</val>", info(462, "net", "bytesRx", "average"));
        assert_eq!(net_counter_ids(&parse(&only_rx)).unwrap(), None);
        assert_eq!(net_counter_ids(&parse("<val/>")).unwrap(), None);
        let bad_key = format!(
            "<val>{}{}</val>",
            info(462, "net", "bytesRx", "average").replace("<key>462</key>", "<key>x</key>"),
            info(463, "net", "bytesTx", "average")
        );
        assert_eq!(net_counter_ids(&parse(&bad_key)).unwrap(), None);
    }

    #[test]
    fn a_query_names_both_counters_in_wsdl_order() {
        let body = query_request(
            &MoRef::new("PerformanceManager", "PerfMgr"),
            &MoRef::new("VirtualMachine", "vm-42"),
            NetCounterIds { rx: 462, tx: 463 },
        );
        let text = String::from_utf8(body).unwrap();
        let spec =
            "<querySpec><entity type=\"VirtualMachine\">vm-42</entity><maxSample>1</maxSample>\
                    <metricId><counterId>462</counterId><instance></instance></metricId>\
                    <metricId><counterId>463</counterId><instance></instance></metricId>\
                    <intervalId>20</intervalId></querySpec>";
        assert!(text.contains(spec), "{text}");
        assert!(text.contains("<_this type=\"PerformanceManager\">PerfMgr</_this>"));
    }

    fn series(counter: &str, instance: &str, values: &[&str]) -> String {
        let values: String = values
            .iter()
            .map(|v| format!("<value>{v}</value>"))
            .collect();
        format!(
            "<value xsi:type=\"PerfMetricIntSeries\"><id><counterId>{counter}</counterId>\
             <instance>{instance}</instance></id>{values}</value>"
        )
    }

    fn answer(series: &str) -> Element {
        parse(&format!(
            "<r xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><returnval xsi:type=\"PerfEntityMetric\">\
             <entity type=\"VirtualMachine\">vm-42</entity>\
             <sampleInfo><timestamp>2026-12-03T18:00:00Z</timestamp><interval>20</interval></sampleInfo>\
             {series}</returnval></r>"
        ))
    }

    const IDS: NetCounterIds = NetCounterIds { rx: 462, tx: 463 };

    #[test]
    fn rates_are_the_latest_aggregate_samples_in_bytes_per_second() {
        let both = answer(&format!(
            "{}{}{}",
            series("462", "vmnic0", &["999"]),
            series("462", "", &["100", "218"]),
            series("463", "", &["277"])
        ));
        assert_eq!(
            rates(&both, IDS).unwrap(),
            NetRates {
                rx_bytes_per_s: Some(218 * 1024),
                tx_bytes_per_s: Some(277 * 1024),
            }
        );
        // -1 is "no data"; a missing series is not known either.
        let none = answer(&series("462", "", &["-1"]));
        assert_eq!(rates(&none, IDS).unwrap(), NetRates::default());
        assert_eq!(rates(&answer(""), IDS).unwrap(), NetRates::default());
        assert!(rates(&answer(&series("462", "", &["lots"])), IDS).is_err());
        assert!(rates(&answer(&series("x", "", &["1"])), IDS).is_err());
    }
}
