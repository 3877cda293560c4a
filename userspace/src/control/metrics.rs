//! Prometheus metrics (OpenMetrics text via prometheus-client), rendered at
//! scrape time from the daemon's status (one source of truth for `status`
//! and `/metrics`) plus the live counters of the flow stream and the DNS
//! hold-time histogram. Labels are low-cardinality: sandboxes, verdicts,
//! reasons, families, outcomes — never addresses or names.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Metrics the serving tasks update in place (shared handles).
#[derive(Clone)]
pub struct Live {
    pub flows: crate::observe::hub::FlowMetrics,
    pub dns_hold: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            flows: Default::default(),
            dns_hold: crate::dns::stats::hold_histogram(),
        }
    }
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The metrics text for a `status` JSON object and the live metrics.
pub fn render(status: &serde_json::Value, live: &Live) -> String {
    // A fresh registry per scrape: counters are set to the kernel's and the
    // daemon's running totals, so they stay monotonic across scrapes.
    let mut registry = Registry::with_prefix("sbx_net");
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let g: Gauge = Gauge::default();
        g.set(value as i64);
        registry.register(name, help, g);
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let c: Counter = Counter::default();
        c.inc_by(value);
        registry.register(name, help, c);
    };

    let info: Family<Labels, Gauge> = Family::default();
    info.get_or_create(&vec![("version".into(), status["version"].as_str().unwrap_or("").into())]).set(1);
    registry.register("build_info", "sbx-net daemon build", info);
    gauge(&mut registry, "uptime_seconds", "Seconds since the daemon started", u(&status["uptime_seconds"]));
    gauge(&mut registry, "sandboxes", "Sandboxes enforced", u(&status["sandboxes"]));
    gauge(&mut registry, "policy_generation", "Policy generation in force", u(&status["policy_generation"]));
    counter(&mut registry, "policy_reload_failures", "Policy loads and reloads rejected", u(&status["reload_failures"]));

    let packets: Family<Labels, Counter> = Family::default();
    let bytes: Family<Labels, Counter> = Family::default();
    if let Some(reasons) = status["datapath"].as_object() {
        for (reason, c) in reasons {
            let labels = vec![("reason".to_string(), reason.clone())];
            packets.get_or_create(&labels).inc_by(u(&c["packets"]));
            bytes.get_or_create(&labels).inc_by(u(&c["bytes"]));
        }
    }
    registry.register("datapath_packets", "Frames from guests by classifier outcome", packets);
    registry.register("datapath_bytes", "Bytes from guests by classifier outcome", bytes);
    counter(&mut registry, "events_lost", "Datapath events that did not fit in the ring buffer", u(&status["events_lost"]));

    let sandbox_packets: Family<Labels, Counter> = Family::default();
    let sandbox_bytes: Family<Labels, Counter> = Family::default();
    if let Some(traffic) = status["sandbox_traffic"].as_object() {
        for (sandbox, classes) in traffic {
            for verdict in ["allowed", "denied", "redirected"] {
                let labels = vec![("sandbox".to_string(), sandbox.clone()), ("verdict".to_string(), verdict.to_string())];
                sandbox_packets.get_or_create(&labels).inc_by(u(&classes[verdict]["packets"]));
                sandbox_bytes.get_or_create(&labels).inc_by(u(&classes[verdict]["bytes"]));
            }
        }
    }
    registry.register("sandbox_packets", "Frames from each sandbox by verdict", sandbox_packets);
    registry.register("sandbox_bytes", "Bytes from each sandbox by verdict", sandbox_bytes);
    let flows: Family<Labels, Counter> = Family::default();
    {
        let counts = live.flows.flows.lock().unwrap_or_else(|p| p.into_inner());
        for ((sandbox, verdict), n) in counts.iter() {
            flows.get_or_create(&vec![("sandbox".to_string(), sandbox.clone()), ("verdict".to_string(), verdict.to_string())]).inc_by(*n);
        }
    }
    registry.register("flows", "Flows the datapath saw start, by sandbox and verdict", flows);
    registry.register("proxy_requests", "Proxy decisions (connections and HTTP requests) by outcome", live.flows.proxy_requests.clone());
    registry.register("credentials_injected", "Requests a credential was injected into", live.flows.credentials_injected.clone());
    registry.register("secret_redactions", "Secrets (or encodings of them) cut out of responses from credential hosts", live.flows.secret_redactions.clone());
    registry.register("credential_failures", "Requests to a credential host sent without the credential (secret unavailable)", live.flows.credential_failures.clone());
    registry.register("audit_records", "Records written to the audit log", live.flows.audit_records.clone());
    registry.register("audit_write_failures", "Audit records that could not be written", live.flows.audit_write_failures.clone());
    registry.register("audit_suppressed", "Audit records not written: their sandbox was over its audit budget", live.flows.audit_suppressed.clone());
    registry.register("dns_hold_seconds", "Time an answer was held while its addresses were written to the maps", live.dns_hold.clone());

    let entries: Family<Labels, Gauge> = Family::default();
    let capacity: Family<Labels, Gauge> = Family::default();
    let maps = &status["maps"];
    for (family, key) in [("ipv4", "policy_v4_entries"), ("ipv6", "policy_v6_entries")] {
        let labels = vec![("family".to_string(), family.to_string())];
        entries.get_or_create(&labels).set(u(&maps[key]) as i64);
        capacity.get_or_create(&labels).set(u(&maps["policy_capacity_per_family"]) as i64);
    }
    registry.register("policy_map_entries", "Entries in the policy tries", entries);
    registry.register("policy_map_capacity", "Capacity of the policy tries", capacity);
    gauge(&mut registry, "flow_table_entries", "Flows in the datapath's LRU flow table", u(&maps["flows"]));
    gauge(&mut registry, "flow_table_capacity", "Capacity of the datapath's LRU flow table", u(&maps["flow_capacity"]));
    gauge(&mut registry, "learned_addresses", "DNS-learned addresses in force", u(&status["learned_addresses"]));

    let dns = &status["dns"];
    let queries: Family<Labels, Counter> = Family::default();
    for (outcome, key) in [("allowed", "queries_allowed"), ("denied", "queries_denied"), ("upstream_failure", "upstream_failures")] {
        queries.get_or_create(&vec![("outcome".to_string(), outcome.to_string())]).inc_by(u(&dns[key]));
    }
    registry.register("dns_queries", "DNS queries by outcome", queries);
    counter(&mut registry, "dns_records_stripped", "Answer records stripped (rebinding)", u(&dns["records_stripped"]));
    counter(&mut registry, "dns_hold_timeouts", "Answers not released because the map write took too long", u(&dns["hold_timeouts"]));

    let available = status["credentials"].as_array().map_or(0, |c| c.iter().filter(|c| c["available"] == true).count());
    let missing = status["credentials"].as_array().map_or(0, |c| c.len()) - available;
    let creds: Family<Labels, Gauge> = Family::default();
    creds.get_or_create(&vec![("state".to_string(), "available".to_string())]).set(available as i64);
    creds.get_or_create(&vec![("state".to_string(), "unavailable".to_string())]).set(missing as i64);
    registry.register("credentials", "Credentials of the policies in force, by whether their secret loaded", creds);

    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String");
    out
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics text, for
/// clients that do not ask for OpenMetrics (curl, `promtool check metrics`):
/// counter families are named with their `_total` suffix, and the `# EOF`
/// and `# UNIT` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ").and_then(|r| r.strip_suffix(" counter")))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_with_low_cardinality_labels() {
        let status = serde_json::json!({
            "version": "0.1.0", "uptime_seconds": 5, "sandboxes": 2, "policy_generation": 3, "reload_failures": 1,
            "datapath": { "allowed": { "packets": 10, "bytes": 1000 }, "default_deny": { "packets": 2, "bytes": 120 } },
            "events_lost": 0,
            "maps": { "policy_v4_entries": 14, "policy_v6_entries": 15, "policy_capacity_per_family": 2097152, "flows": 3, "flow_capacity": 65536 },
            "learned_addresses": 4,
            "sandbox_traffic": { "a": { "allowed": { "packets": 3, "bytes": 300 }, "denied": { "packets": 1, "bytes": 60 }, "redirected": { "packets": 4, "bytes": 400 } } },
            "dns": { "queries_allowed": 7, "queries_denied": 3, "upstream_failures": 0, "records_stripped": 1, "hold_timeouts": 0 },
            "credentials": [ { "available": true }, { "available": false } ],
        });
        let live = Live::default();
        live.flows.flows.lock().unwrap().insert(("a".into(), "denied"), 1);
        live.dns_hold.observe(0.0002);
        let text = render(&status, &live);
        for line in [
            "sbx_net_sandboxes 2",
            "sbx_net_datapath_packets_total{reason=\"allowed\"} 10",
            "sbx_net_datapath_bytes_total{reason=\"default_deny\"} 120",
            "sbx_net_dns_queries_total{outcome=\"denied\"} 3",
            "sbx_net_policy_map_entries{family=\"ipv6\"} 15",
            "sbx_net_policy_reload_failures_total 1",
            "sbx_net_build_info{version=\"0.1.0\"} 1",
            "sbx_net_credentials{state=\"unavailable\"} 1",
            "# TYPE sbx_net_datapath_packets counter",
            "sbx_net_flows_total{sandbox=\"a\",verdict=\"denied\"} 1",
            "sbx_net_sandbox_packets_total{sandbox=\"a\",verdict=\"redirected\"} 4",
            "sbx_net_dns_hold_seconds_bucket{le=\"0.00025\"} 1",
            "sbx_net_dns_hold_seconds_count 1",
            "sbx_net_flow_table_capacity 65536",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(text.trim_end().ends_with("# EOF"));
        let classic = to_prometheus_text(&text);
        assert!(classic.contains("# TYPE sbx_net_policy_reload_failures_total counter\n"), "{classic}");
        assert!(classic.contains("# HELP sbx_net_flows_total Flows the datapath"), "{classic}");
        assert!(classic.contains("# TYPE sbx_net_sandboxes gauge\n"), "{classic}");
        assert!(classic.contains("# TYPE sbx_net_dns_hold_seconds histogram\n"), "{classic}");
        assert!(!classic.contains("# EOF"));
    }
}
