//! The table the proxies and the event reader look sandboxes up in (guest
//! address → route), kept current by the control thread: the daemon's own
//! copy (its `/metrics` collector names sandboxes with it) and the data
//! plane's, pushed over its socket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::control::dataplane::{CredentialEntry, SandboxEntry};
use crate::policy::compile::CompiledPolicy;
use crate::sandbox::route::Route;
use crate::sandbox::SandboxSpec;

use super::{Daemon, DaemonError};

impl Daemon {
    /// Replaces the whole table from the state.
    pub(super) fn publish_routes(&self) {
        let mut table = HashMap::new();
        let mut entries = Vec::new();
        for (name, record) in &self.state.sandboxes {
            let (Ok(spec), Some(route)) = (self.spec(record), self.route(name)) else { continue };
            table.insert(IpAddr::V4(spec.guest_ipv4), route.clone());
            table.insert(IpAddr::V6(spec.guest_ipv6), route.clone());
            if let Ok(entry) = self.plane_entry(name, route.policy.clone(), route.policy_id) {
                entries.push(entry);
            }
        }
        *self.shared.routes.write().unwrap_or_else(|p| p.into_inner()) = table;
        self.shared.link.apply(entries, self.state.sandboxes.keys().cloned().collect());
    }

    /// The daemon's own copy of a new sandbox's route (the data plane's is
    /// pushed with [`Daemon::plane_entry_for`] while the create installs).
    pub(super) fn publish_own_route(&self, name: &str, spec: &SandboxSpec) {
        let Some(route) = self.route(name) else { return };
        let mut table = self.shared.routes.write().unwrap_or_else(|p| p.into_inner());
        table.insert(IpAddr::V4(spec.guest_ipv4), route.clone());
        table.insert(IpAddr::V6(spec.guest_ipv6), route);
    }

    pub(super) fn unpublish_routes(&self, spec: &SandboxSpec) {
        {
            let mut table = self.shared.routes.write().unwrap_or_else(|p| p.into_inner());
            table.remove(&IpAddr::V4(spec.guest_ipv4));
            table.remove(&IpAddr::V6(spec.guest_ipv6));
        }
        self.shared.link.remove(&spec.name);
    }

    /// The daemon's copy of a sandbox's route: the proxies run in the data
    /// plane, so its credentials and CA are only in the data plane's.
    fn route(&self, name: &str) -> Option<Arc<Route>> {
        let record = self.state.sandboxes.get(name)?;
        Some(Arc::new(Route {
            sandbox: name.to_string(),
            id: record.id,
            policy: self.in_force.policies.get(name)?.clone(),
            policy_id: record.policy_id,
            credentials: Vec::new(),
            ca: None,
        }))
    }

    /// The sandbox as the data plane gets it, under `policy` and `policy_id`.
    pub(super) fn plane_entry(&self, name: &str, policy: Arc<CompiledPolicy>, policy_id: u32) -> Result<SandboxEntry, DaemonError> {
        let record = self.state.sandboxes.get(name).ok_or_else(|| DaemonError::NoSuchSandbox(name.to_string()))?;
        let spec = self.spec(record)?;
        let ca_dir = self.config.sandbox_ca_dir(name);
        let has_ca = ca_dir.join("ca.key").exists();
        Ok(self.plane_entry_for(&spec, &record.policy, policy, policy_id, has_ca))
    }

    /// The data plane's entry of the sandbox `spec` under the policy named
    /// `policy_name`, compiled as `policy` (also before the sandbox is
    /// recorded: a create pushes it while the kernel work runs).
    pub(super) fn plane_entry_for(&self, spec: &SandboxSpec, policy_name: &str, policy: Arc<CompiledPolicy>, policy_id: u32, has_ca: bool) -> SandboxEntry {
        SandboxEntry {
            name: spec.name.clone(),
            id: spec.id,
            guest_ipv4: spec.guest_ipv4,
            guest_ipv6: spec.guest_ipv6,
            policy_id,
            policy,
            credentials: self.credential_entries(policy_name),
            ca_dir: has_ca.then(|| self.config.sandbox_ca_dir(&spec.name)),
        }
    }

    /// The credentials of `policy` with their loaded secrets.
    fn credential_entries(&self, policy: &str) -> Vec<CredentialEntry> {
        let Some(entry) = self.policies.set.get(policy) else { return Vec::new() };
        entry
            .policy
            .credentials
            .iter()
            .filter_map(|c| {
                let secret = self.policies.secrets.secrets.get(&(policy.to_string(), c.name.clone()))?.as_ref().ok()?;
                Some(CredentialEntry {
                    name: c.name.clone(),
                    hosts: c.hosts.clone(),
                    header: c.header.clone(),
                    format: c.format.clone(),
                    secret: secret.expose().to_string(),
                    allow_plaintext: c.allow_plaintext,
                })
            })
            .collect()
    }
}
