//! The datapath's numbers for `/metrics`, read from the pinned maps at
//! scrape time: the classifier's counters by reason, the lost-event count,
//! each sandbox's packets and bytes by verdict, and how full the policy
//! tries and flow tables are. The kernel's numbers, as they are when
//! scraped.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use sbx_net_common::{Counter, Reason, EVENTS_LOST_SLOT};

use crate::datapath::nft::Meter;
use crate::datapath::{PinnedStats, SANDBOX_VERDICT_CLASSES};
use crate::sandbox::route::Routes;

use super::metrics::{encode_counter, encode_counters, encode_gauge, encode_gauges};

/// Verdict classes of the per-sandbox counters, in their slot order
/// ([`sbx_net_common::verdict_class`]).
const VERDICT_CLASSES: [&str; SANDBOX_VERDICT_CLASSES] = ["allowed", "denied", "redirected", "audit"];

/// Reads the pinned maps on every scrape; sandbox ids are named from the
/// route table (the sandboxes the daemon enforces).
pub struct DatapathCollector {
    maps: PinnedStats,
    routes: Routes,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCollector").field("maps", &self.maps).finish_non_exhaustive()
    }
}

impl DatapathCollector {
    pub fn new(maps: PinnedStats, routes: Routes) -> DatapathCollector {
        DatapathCollector { maps, routes }
    }

    /// Sandbox id → name, for the sandboxes in the route table.
    fn sandboxes(&self) -> std::collections::BTreeMap<u32, String> {
        let table = self.routes.read().unwrap_or_else(|p| p.into_inner());
        table.values().map(|r| (r.id, r.sandbox.clone())).collect()
    }
}

/// The families of the counter array: packets and bytes by reason, and the
/// lost-event slot (whose `packets` is the count).
pub fn encode_reason_counters(encoder: &mut DescriptorEncoder, counters: &[Counter]) -> Result<(), std::fmt::Error> {
    let by_reason = || Reason::ALL.into_iter().filter_map(|r| Some((r.name(), counters.get(r as usize)?)));
    encode_counters(encoder, "datapath_packets", "Frames from guests by classifier outcome", by_reason().map(|(r, c)| ([("reason", r)], c.packets)))?;
    encode_counters(encoder, "datapath_bytes", "Bytes from guests by classifier outcome", by_reason().map(|(r, c)| ([("reason", r)], c.bytes)))?;
    let lost = counters.get(EVENTS_LOST_SLOT as usize).map_or(0, |c| c.packets);
    encode_counter(encoder, "events_lost", "Datapath events that did not fit in the ring buffer", lost)
}

/// The per-sandbox families: packets and bytes by sandbox and verdict.
pub fn encode_sandbox_counters(encoder: &mut DescriptorEncoder, sandboxes: &[(String, [Counter; SANDBOX_VERDICT_CLASSES])]) -> Result<(), std::fmt::Error> {
    let series = || sandboxes.iter().flat_map(|(name, classes)| VERDICT_CLASSES.iter().zip(classes).map(move |(v, c)| ([("sandbox", name.as_str()), ("verdict", *v)], c)));
    encode_counters(encoder, "sandbox_packets", "Frames from each sandbox by verdict", series().map(|(l, c)| (l, c.packets)))?;
    encode_counters(encoder, "sandbox_bytes", "Bytes from each sandbox by verdict", series().map(|(l, c)| (l, c.bytes)))
}

/// Packets the per-sandbox meters dropped, by meter (each meter's series
/// present when its rules are in the table).
pub fn encode_meter_drops(encoder: &mut DescriptorEncoder, drops: &std::collections::BTreeMap<Meter, u64>) -> Result<(), std::fmt::Error> {
    encode_counters(
        encoder,
        "meter_drops",
        "Packets dropped by a per-sandbox meter before the proxies' shared sockets (a sandbox past its DNS query or new-connection rate)",
        drops.iter().map(|(meter, packets)| ([("meter", meter.label())], *packets)),
    )
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A map that cannot be read leaves its families out of this scrape
        // (absent, not a made-up zero) and says why in the log.
        match self.maps.counters() {
            Ok(counters) => encode_reason_counters(&mut encoder, &counters)?,
            Err(e) => tracing::warn!("/metrics: datapath counters unreadable: {e}"),
        }
        let sandboxes: Result<Vec<(String, [Counter; SANDBOX_VERDICT_CLASSES])>, _> =
            self.sandboxes().into_iter().map(|(id, name)| self.maps.sandbox_counters(id).map(|c| (name, c))).collect();
        match sandboxes {
            Ok(sandboxes) => encode_sandbox_counters(&mut encoder, &sandboxes)?,
            Err(e) => tracing::warn!("/metrics: per-sandbox counters unreadable: {e}"),
        }
        let (v4, v6) = self.maps.policy_entry_counts();
        let capacity = i64::from(self.maps.policy_capacity());
        encode_gauges(&mut encoder, "policy_map_entries", "Entries in the policy tries", [([("family", "ipv4")], v4 as i64), ([("family", "ipv6")], v6 as i64)])?;
        encode_gauges(&mut encoder, "policy_map_capacity", "Capacity of the policy tries", [([("family", "ipv4")], capacity), ([("family", "ipv6")], capacity)])?;
        match crate::datapath::nft::Nftables::new().meter_drops() {
            Ok(drops) => encode_meter_drops(&mut encoder, &drops)?,
            Err(e) => tracing::warn!("/metrics: the per-sandbox meters' counters unreadable: {e}"),
        }
        encode_gauge(&mut encoder, "flow_table_entries", "Flows in the datapath's LRU flow table", self.maps.flow_count() as i64)?;
        encode_gauge(&mut encoder, "flow_table_capacity", "Capacity of the datapath's LRU flow table", i64::from(self.maps.flow_capacity()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::metrics::collected_text as rendered;

    #[test]
    fn kernel_counters_become_reason_and_sandbox_families() {
        let mut counters = vec![Counter::default(); sbx_net_common::COUNTER_ARRAY_LEN as usize];
        counters[Reason::Allowed as usize] = Counter { packets: 10, bytes: 1000 };
        counters[Reason::DefaultDeny as usize] = Counter { packets: 2, bytes: 120 };
        counters[Reason::Audit as usize] = Counter { packets: 5, bytes: 300 };
        counters[EVENTS_LOST_SLOT as usize] = Counter { packets: 7, bytes: 0 };
        let text = rendered(move |e| encode_reason_counters(e, &counters));
        for line in [
            "# TYPE sbx_net_datapath_packets counter",
            "sbx_net_datapath_packets_total{reason=\"allowed\"} 10",
            "sbx_net_datapath_bytes_total{reason=\"default_deny\"} 120",
            "sbx_net_datapath_packets_total{reason=\"policy_deny\"} 0",
            "sbx_net_datapath_packets_total{reason=\"audit\"} 5",
            "sbx_net_events_lost_total 7",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("sbx_net_datapath_packets_total")).count(), Reason::ALL.len(), "one series per reason");
        let sandboxes = vec![("a".to_string(), [Counter { packets: 3, bytes: 300 }, Counter { packets: 1, bytes: 60 }, Counter { packets: 4, bytes: 400 }, Counter { packets: 2, bytes: 120 }])];
        let text = rendered(move |e| encode_sandbox_counters(e, &sandboxes));
        for line in [
            "sbx_net_sandbox_packets_total{sandbox=\"a\",verdict=\"allowed\"} 3",
            "sbx_net_sandbox_packets_total{sandbox=\"a\",verdict=\"redirected\"} 4",
            "sbx_net_sandbox_bytes_total{sandbox=\"a\",verdict=\"denied\"} 60",
            "sbx_net_sandbox_packets_total{sandbox=\"a\",verdict=\"audit\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        let drops = std::collections::BTreeMap::from([(Meter::DnsQueries, 12), (Meter::NewConnections, 0)]);
        let text = rendered(move |e| encode_meter_drops(e, &drops));
        for line in ["sbx_net_meter_drops_total{meter=\"dns_queries\"} 12", "sbx_net_meter_drops_total{meter=\"new_connections\"} 0"] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
