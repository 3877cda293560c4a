//! The table the proxies and the event reader look sandboxes up in (guest
//! address → route), kept current by the control thread.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::credentials::CredentialBinding;
use crate::sandbox::route::Route;
use crate::sandbox::SandboxSpec;

use super::Daemon;

impl Daemon {
    /// Replaces the whole table from the state.
    pub(super) fn publish_routes(&self) {
        let mut table = HashMap::new();
        for (name, record) in &self.state.sandboxes {
            let (Ok(spec), Some(route)) = (self.spec(record), self.route(name)) else { continue };
            table.insert(IpAddr::V4(spec.guest_ipv4), route.clone());
            table.insert(IpAddr::V6(spec.guest_ipv6), route);
        }
        *self.shared.routes.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    pub(super) fn publish_route(&self, name: &str, spec: &SandboxSpec) {
        let Some(route) = self.route(name) else { return };
        let mut table = self.shared.routes.write().unwrap_or_else(|p| p.into_inner());
        table.insert(IpAddr::V4(spec.guest_ipv4), route.clone());
        table.insert(IpAddr::V6(spec.guest_ipv6), route);
    }

    pub(super) fn unpublish_routes(&self, spec: &SandboxSpec) {
        let mut table = self.shared.routes.write().unwrap_or_else(|p| p.into_inner());
        table.remove(&IpAddr::V4(spec.guest_ipv4));
        table.remove(&IpAddr::V6(spec.guest_ipv6));
    }

    /// What the proxies need to know about a sandbox's traffic.
    fn route(&self, name: &str) -> Option<Arc<Route>> {
        let record = self.state.sandboxes.get(name)?;
        Some(Arc::new(Route {
            sandbox: name.to_string(),
            id: record.id,
            policy: self.in_force.policies.get(name)?.clone(),
            policy_id: record.policy_id,
            credentials: self.bindings(&record.policy),
            ca: self.in_force.cas.get(name).cloned(),
        }))
    }

    /// The credentials of `policy` whose secrets are loaded, ready to inject.
    fn bindings(&self, policy: &str) -> Vec<Arc<CredentialBinding>> {
        let Some(entry) = self.policies.set.get(policy) else { return Vec::new() };
        entry
            .policy
            .credentials
            .iter()
            .filter_map(|c| {
                let secret = self.policies.secrets.secrets.get(&(policy.to_string(), c.name.clone()))?.as_ref().ok()?.clone();
                match CredentialBinding::new(&c.name, &c.hosts, &c.header, &c.format, secret, c.allow_plaintext) {
                    Ok(b) => Some(Arc::new(b)),
                    Err(e) => {
                        tracing::warn!(policy, "{e}");
                        None
                    }
                }
            })
            .collect()
    }
}
