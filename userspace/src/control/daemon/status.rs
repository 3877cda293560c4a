//! The read-only answers: a sandbox's network (`sandbox show`), the
//! policies (`policy list`, `policy test`) and `status`.

use serde_json::json;
use sbx_net_common::{Reason, EVENTS_LOST_SLOT};

use crate::control::api::{format_mac, SandboxInfo};
use crate::control::state::SandboxRecord;
use crate::policy::explain::{parse_query, test_query, Redirects};

use super::{Daemon, DaemonError};

impl Daemon {
    /// What `sandbox create` and `sandbox show` print.
    pub(super) fn info(&self, record: &SandboxRecord) -> Result<SandboxInfo, DaemonError> {
        let spec = self.spec(record)?;
        let ca_cert = self.config.sandbox_ca_dir(&record.name).join("ca.pem");
        Ok(SandboxInfo {
            name: record.name.clone(),
            id: record.id,
            policy: record.policy.clone(),
            policy_generation: record.policy_generation,
            tap: record.tap.clone(),
            adopted_tap: record.adopted_tap,
            netns: record.netns_guest.then(|| spec.netns.clone()),
            guest_ipv4: spec.guest_ipv4.to_string(),
            guest_ipv6: spec.guest_ipv6.to_string(),
            guest_mac: format_mac(spec.guest_mac),
            gateway_ipv4: spec.gateway_ipv4.to_string(),
            gateway_ipv6: spec.gateway_ipv6.to_string(),
            gateway_mac: format_mac(spec.gateway_mac),
            ipv4_prefix_len: crate::sandbox::SANDBOX_IPV4_PREFIX_LEN,
            ipv6_prefix_len: crate::sandbox::SANDBOX_IPV6_PREFIX_LEN,
            dns: spec.gateway_ipv4.to_string(),
            ca_cert: if ca_cert.exists() { ca_cert.display().to_string() } else { String::new() },
            created_unix: record.created_unix,
            mounts: self.in_force.policies.get(&record.name).map(|p| p.filesystem.clone()).unwrap_or_default(),
            vm: record.vm_pid.map(|pid| crate::control::api::VmInfo {
                pid,
                state: if crate::sandbox::vm_process::vm_alive(pid, &record.name) { "running" } else { "exited" }.to_string(),
                console: self.host.settings.vm_log(&record.name).display().to_string(),
            }),
        })
    }

    pub(super) fn policy_list(&self) -> serde_json::Value {
        let list: Vec<_> = self
            .policies
            .set
            .values()
            .map(|e| {
                let users: Vec<&String> = self.state.sandboxes.values().filter(|r| r.policy == e.policy.name).map(|r| &r.name).collect();
                json!({
                    "name": e.policy.name,
                    "source": e.source,
                    "default": e.policy.default.as_str(),
                    "rules": e.policy.rules.len(),
                    "credentials": e.policy.credentials.len(),
                    "sandboxes": users,
                })
            })
            .collect();
        json!(list)
    }

    pub(super) fn policy_test(&self, sandbox: &str, destination: &str) -> Result<serde_json::Value, DaemonError> {
        let policy = self.in_force.policies.get(sandbox).ok_or_else(|| DaemonError::NoSuchSandbox(sandbox.to_string()))?;
        let query = parse_query(destination).map_err(DaemonError::BadDestination)?;
        let outcome = test_query(policy, &query, &Redirects { proxied_ports: &self.config.proxied_ports });
        Ok(json!({
            "sandbox": sandbox,
            "destination": destination,
            "policy": policy.policy_name,
            "verdict": outcome.verdict,
            "rule": outcome.rule,
            "path": outcome.path,
            "explanation": outcome.explanation,
        }))
    }

    pub(super) fn status(&self) -> Result<serde_json::Value, DaemonError> {
        let datapath = &self.host.datapath;
        let (v4, v6) = datapath.policy_entry_counts()?;
        let counters = datapath.counters()?;
        let mut traffic = serde_json::Map::new();
        for record in self.state.sandboxes.values() {
            let c = datapath.sandbox_counters(record.id)?;
            let class = |c: sbx_net_common::Counter| json!({ "packets": c.packets, "bytes": c.bytes });
            traffic.insert(record.name.clone(), json!({ "allowed": class(c[0]), "denied": class(c[1]), "redirected": class(c[2]), "audit": class(c[3]) }));
        }
        let mut by_reason = serde_json::Map::new();
        for reason in Reason::ALL {
            let c = counters[reason as usize];
            by_reason.insert(reason.name().to_string(), json!({ "packets": c.packets, "bytes": c.bytes }));
        }
        let dataplane = self.shared.link.status();
        // Packets each per-sandbox meter dropped (the meters' rule counters).
        let meter_drops = match self.host.nft.meter_drops() {
            Ok(drops) => json!(drops.iter().map(|(m, n)| (m.label(), *n)).collect::<std::collections::BTreeMap<_, _>>()),
            Err(e) => json!({ "error": e.to_string() }),
        };
        Ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "sandboxes": self.state.sandboxes.len(),
            "sandbox_names": self.state.sandboxes.keys().collect::<Vec<_>>(),
            "policy_generation": self.state.policy_generation,
            "policies": self.policies.set.iter().map(|(name, e)| json!({
                "name": name,
                "source": e.source,
                "sandboxes": self.state.sandboxes.values().filter(|r| &r.policy == name).count(),
            })).collect::<Vec<_>>(),
            "reload_failures": self.policies.reload_failures,
            "prewarmed_taps": self.pool.ready_count(),
            "credentials": self.policies.secrets.report(),
            "taps_being_removed": self.reaper.in_flight(),
            "build": crate::control::dataplane::build_id(),
            "dns": dataplane["stats"]["dns"].clone(),
            "learned_addresses": dataplane["stats"]["learned_addresses"].clone(),
            "dataplane": dataplane,
            "last_reload_error": self.policies.last_reload_error,
            "maps": {
                "policy_v4_entries": v4,
                "policy_v6_entries": v6,
                "policy_capacity_per_family": self.config.policy_map_entries,
                "sandbox_slots_used": self.state.sandboxes.len(),
                "sandbox_slots": sbx_net_common::SANDBOX_SLOTS,
                "flows": datapath.flow_count()?,
                "flow_capacity": self.config.flow_table_size,
            },
            "sandbox_traffic": traffic,
            "datapath": by_reason,
            "events_lost": counters[EVENTS_LOST_SLOT as usize].packets,
            "meter_drops": meter_drops,
            "bpf_dir": self.config.bpf_dir,
            "state_dir": self.config.state_dir,
            "host": self.host_checks,
            "reap_failures": self.reaper.failures(),
            "fleet": self.fleet_status(),
        }))
    }
}
