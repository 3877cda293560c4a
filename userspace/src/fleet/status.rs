//! What a host publishes under `PREFIX/status/HOST` (on a lease, so a host
//! that is gone disappears), and the operator's view of all of them.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::reconcile::Rejection;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    pub group: Option<String>,
    pub version: String,
    pub pid: u32,
    /// Whether the host's watch on the store is up.
    pub connected: bool,
    /// The policies in force came from the cache in the state dir (the
    /// store has not been reached since the host started).
    pub from_cache: bool,
    /// The store revision the host has seen everything up to.
    pub revision: i64,
    /// The revision of the last change the host accepted.
    pub applied_revision: i64,
    /// The daemon's policy generation (a light host: changes accepted).
    pub policy_generation: u64,
    /// Each key in force, at its modification revision.
    pub in_force: BTreeMap<String, i64>,
    pub rejected: Vec<Rejection>,
    pub last_error: Option<String>,
    pub updated_unix_ms: u64,
    /// A light host of the fleet benchmark (no datapath).
    #[serde(default)]
    pub light: bool,
}

/// The host's fleet families for `/metrics`, read from its status at
/// scrape time: whether the watch is up, the revisions, the keys rejected
/// (an alert on `sbx_net_fleet_rejected_keys > 0` finds a host that
/// refused a policy), whether it runs on its cache.
pub fn register_metrics(status: std::sync::Arc<std::sync::Mutex<HostStatus>>, registry: &mut prometheus_client::registry::Registry) {
    use crate::observe::metrics::{encode_gauge, CollectWith};
    registry.register_collector(Box::new(CollectWith("fleet", move |encoder: &mut prometheus_client::encoding::DescriptorEncoder| {
        let s = status.lock().expect("status lock").clone();
        encode_gauge(encoder, "fleet_connected", "1 while the host's watch on the fleet's etcd is up", i64::from(s.connected))?;
        encode_gauge(encoder, "fleet_from_cache", "1 while the policies in force come from the state dir's cache (etcd not reached since start)", i64::from(s.from_cache))?;
        encode_gauge(encoder, "fleet_revision", "The etcd revision the host has seen every policy change up to", s.revision)?;
        encode_gauge(encoder, "fleet_applied_revision", "The etcd revision of the last policy change the host put in force", s.applied_revision)?;
        encode_gauge(encoder, "fleet_rejected_keys", "Policy keys in etcd the host rejects (invalid, or refused for its sandboxes)", s.rejected.len() as i64)
    })));
}

/// `fleet status`: one line per host, then one per rejection.
pub fn render(policies_revision: i64, hosts: &[HostStatus]) -> String {
    let mut out = String::new();
    let behind = hosts.iter().filter(|h| h.revision < policies_revision).count();
    let _ = writeln!(out, "latest policy write at revision {policies_revision}; {} host(s), {behind} behind it", hosts.len());
    let _ = writeln!(out, "{:<24} {:<12} {:>9} {:>10} {:<10} {:>8}", "HOST", "GROUP", "REVISION", "GENERATION", "STATE", "REJECTED");
    for h in hosts {
        let state = match (h.connected, h.from_cache) {
            (true, _) => "watching",
            (false, true) => "cached",
            (false, false) => "offline",
        };
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:>9} {:>10} {:<10} {:>8}",
            h.host,
            h.group.as_deref().unwrap_or("-"),
            h.revision,
            h.policy_generation,
            state,
            h.rejected.len()
        );
    }
    for h in hosts {
        for r in &h.rejected {
            let _ = writeln!(out, "{} rejected {}@{}: {}", h.host, r.key, r.mod_revision, r.reason);
        }
        if let Some(e) = &h.last_error {
            let _ = writeln!(out, "{} last error: {e}", h.host);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_hosts_and_rejections() {
        let h = HostStatus {
            host: "h1".into(),
            connected: true,
            revision: 12,
            policy_generation: 3,
            rejected: vec![Rejection { key: "/f/policies/all/web".into(), mod_revision: 11, reason: "etcd:/f/policies/all/web:3: bad".into() }],
            ..Default::default()
        };
        let text = render(12, &[h]);
        assert!(text.contains("h1") && text.contains("watching"), "{text}");
        assert!(text.contains("h1 rejected /f/policies/all/web@11: etcd:/f/policies/all/web:3: bad"), "{text}");
        let shared = std::sync::Arc::new(std::sync::Mutex::new(HostStatus { connected: true, revision: 9, ..Default::default() }));
        let mut registry = prometheus_client::registry::Registry::with_prefix("sbx_net");
        register_metrics(shared.clone(), &mut registry);
        shared.lock().unwrap().rejected.push(Rejection { key: "k".into(), mod_revision: 1, reason: "r".into() });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in ["sbx_net_fleet_connected 1", "sbx_net_fleet_revision 9", "sbx_net_fleet_rejected_keys 1", "sbx_net_fleet_from_cache 0"] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        let json = serde_json::to_string(&HostStatus::default()).unwrap();
        assert_eq!(serde_json::from_str::<HostStatus>(&json).unwrap(), HostStatus::default());
    }
}
