//! The daemon as a fleet host: the fleet's policies overlay the local ones
//! (embedded default < policy dir < etcd, by name), a change from the
//! watcher is switched to exactly as `policy apply` switches, and a host
//! that starts without the store enforces the set it cached.

use crate::control::config::DaemonConfig;
use crate::fleet::cache::FleetCache;
use crate::fleet::reconcile::{FleetView, Refusal};
use crate::fleet::watch::{FleetChange, SharedStatus};
use crate::fleet::FleetError;
use crate::policy::store::{load_policies, PolicyEntry, PolicySet};

use super::{Daemon, DaemonError};

/// What the daemon keeps of its fleet role.
pub(super) struct FleetRole {
    /// The fleet's effective policies in force (all names).
    pub entries: Vec<PolicyEntry>,
    /// The local policies (embedded default, policy dir) as last loaded:
    /// a fleet change overlays these, it does not re-read the directory (an
    /// edit there goes live with `policy reload`, not with a push).
    pub local: PolicySet,
    /// Where the last good set is kept (`fleet-cache.json` in the state dir).
    pub cache_path: std::path::PathBuf,
    /// The last good set read at start (the watcher starts from it).
    pub cache: Option<FleetCache>,
    /// What the watcher publishes (`status` shows it).
    pub status: Option<SharedStatus>,
}

impl FleetRole {
    /// The cached set for this configuration, as effective entries.
    pub fn load(config: &DaemonConfig) -> Result<Option<FleetRole>, FleetError> {
        let Some(fleet) = &config.fleet else { return Ok(None) };
        let source = fleet.source()?;
        let host = fleet.identity()?;
        let path = crate::fleet::cache::path(&config.state_dir);
        let cache = FleetCache::load(&path, &source.layout.prefix, &host.name, host.group.as_deref())?;
        let local = load_policies(config.policy_dir.as_deref(), &config.applied_policy_dir())
            .unwrap_or_else(|_| load_policies(None, std::path::Path::new("/nonexistent")).expect("the embedded default loads"));
        let entries = match &cache {
            Some(c) => {
                let view = FleetView::new(source.layout.clone(), host, c.good.clone());
                let plan = view.plan();
                tracing::info!(revision = c.revision, policies = plan.entries.len(), "fleet: enforcing the cached policy set until the store answers");
                plan.entries
            }
            None => Vec::new(),
        };
        Ok(Some(FleetRole { entries, local, cache_path: path, cache, status: None }))
    }
}

/// `set` with `entries` over it, by name.
pub(super) fn overlay(mut set: PolicySet, entries: &[PolicyEntry]) -> PolicySet {
    for entry in entries {
        set.insert(entry.policy.name.clone(), entry.clone());
    }
    set
}

impl Daemon {
    /// The local policies read again, with the fleet's over them; the
    /// local set is kept once the caller has put it in force.
    pub(super) fn local_and_fleet(&self) -> Result<(PolicySet, PolicySet), DaemonError> {
        let local = load_policies(self.config.policy_dir.as_deref(), &self.config.applied_policy_dir())?;
        let all = match &self.fleet {
            Some(role) => overlay(local.clone(), &role.entries),
            None => local.clone(),
        };
        Ok((local, all))
    }

    /// A change from the fleet: the whole effective set, switched to all
    /// or nothing. As `policy apply` does with its file, the new set is
    /// persisted first (a daemon killed mid-switch restarts on the newer,
    /// validated set, never on an older one) and put back if the switch
    /// fails. A refusal names the policy concerned when it can, so the
    /// watcher leaves only that policy's change out.
    pub fn fleet_apply(&mut self, change: FleetChange) -> Result<u64, Refusal> {
        let refusal = |policy: Option<String>, e: &dyn std::fmt::Display| Refusal { policy, reason: e.to_string() };
        let Some(role) = self.fleet.as_ref() else { return Err(refusal(None, &"this daemon is not a fleet host")) };
        let new = overlay(role.local.clone(), &change.entries);
        let cache_path = role.cache_path.clone();
        // Each sandbox's policy must still exist and compile for it; the
        // refusal names that policy.
        for record in self.state.sandboxes.values() {
            let Some(entry) = new.get(&record.policy) else {
                return Err(refusal(Some(record.policy.clone()), &DaemonError::PolicyInUse { policy: record.policy.clone(), sandbox: record.name.clone() }));
            };
            let compiled = self.spec(record).and_then(|spec| Ok(self.host.compile_for(&entry.policy, &spec)?));
            if let Err(e) = compiled {
                return Err(refusal(Some(record.policy.clone()), &format!("{}: sandbox {}: {e}", entry.source, record.name)));
            }
        }
        let previous_cache = std::fs::read(&cache_path).ok();
        change.cache.save(&cache_path).map_err(|e| refusal(None, &e))?;
        let previous = self.fleet.as_mut().map(|f| std::mem::replace(&mut f.entries, change.entries));
        let applied = match self.switch_to(new) {
            Ok(_) => Ok(self.state.policy_generation),
            Err(e) => {
                let policy = match &e {
                    DaemonError::RolledBack { sandbox, .. } => self.state.sandboxes.get(sandbox).map(|r| r.policy.clone()),
                    DaemonError::PolicyInUse { policy, .. } => Some(policy.clone()),
                    _ => None,
                };
                if let (Some(role), Some(previous)) = (self.fleet.as_mut(), previous) {
                    role.entries = previous;
                }
                let restored = match previous_cache {
                    Some(bytes) => crate::util::fs::write_atomic(&cache_path, &bytes),
                    None => std::fs::remove_file(&cache_path),
                };
                if let Err(io) = restored {
                    tracing::error!(path = %cache_path.display(), "fleet: putting the cache back after a refused change: {io}");
                }
                self.policies.reload_failures += 1;
                self.policies.last_reload_error = Some(e.to_string());
                Err(refusal(policy, &e))
            }
        };
        // A fleet change comes outside a request: /metrics learns of it here.
        self.publish_metrics();
        applied
    }

    /// The local set a reload put in force.
    pub(super) fn keep_local(&mut self, local: PolicySet) {
        if let Some(role) = self.fleet.as_mut() {
            role.local = local;
        }
    }

    /// The fleet part of `status`.
    pub(super) fn fleet_status(&self) -> serde_json::Value {
        let Some(role) = &self.fleet else { return serde_json::Value::Null };
        let source = self.config.fleet.as_ref().map(|f| f.source.clone()).unwrap_or_default();
        let mut v = match &role.status {
            Some(status) => serde_json::to_value(&*status.lock().expect("status lock")).expect("status serializes"),
            None => serde_json::json!({}),
        };
        v["source"] = serde_json::Value::String(source);
        // The daemon's own generation (a local reload moves it too).
        v["policy_generation"] = serde_json::json!(self.state.policy_generation);
        v
    }

    /// The watcher's status, once it runs.
    pub fn set_fleet_status(&mut self, status: SharedStatus) {
        status.lock().expect("status lock").policy_generation = self.state.policy_generation;
        if let Some(role) = self.fleet.as_mut() {
            role.status = Some(status);
        }
    }

    /// The cache the daemon started from (handed to the watcher).
    pub fn take_fleet_cache(&mut self) -> Option<FleetCache> {
        self.fleet.as_mut().and_then(|f| f.cache.take())
    }
}
