//! Policy changes: `policy apply` and `policy reload` validate a whole new
//! policy set, then switch each sandbox whose policy text changed to a new
//! generation (with its DNS-learned addresses carried over), all or nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;

use crate::control::state::{text_hash, PolicyText, SandboxRecord};
use crate::control::dataplane::SwitchRequest;
use crate::dns::decide::LearnedAddr;
use crate::policy::compile::CompiledPolicy;
use crate::policy::store::{PolicyEntry, PolicySet};
use crate::sandbox::SandboxSpec;

use super::{io_err, Daemon, DaemonError};

/// A sandbox a policy change switched, with what it had before (to roll back to).
struct Switched {
    record: SandboxRecord,
    policy: Arc<CompiledPolicy>,
    learned: HashMap<IpAddr, LearnedAddr>,
}

/// A sandbox whose policy text changes, compiled for it.
struct Plan {
    name: String,
    spec: SandboxSpec,
    compiled: CompiledPolicy,
    hash: String,
    entry: PolicyEntry,
}

impl Daemon {
    /// Switches a sandbox to a new policy generation: its static entries
    /// are written here under the new id; the data plane carries its
    /// DNS-learned addresses (recomputed under the new policy) into it and
    /// flips the tap's config, under its learned-store lock, so no answer is
    /// learned into the generation being left. Then the old entries go.
    pub(super) fn switch_generation(
        &mut self,
        sandbox: &str,
        ifindex: u32,
        config: &sbx_net_common::SandboxConfig,
        new: &CompiledPolicy,
        (old_policy_id, old): (u32, &CompiledPolicy),
        restore: Option<&HashMap<IpAddr, LearnedAddr>>,
    ) -> Result<(), DaemonError> {
        // What a failure half way wrote under the new id is taken out again.
        if let Err(e) = self.host.datapath.write_policy(config.policy_id, new) {
            self.host.datapath.remove_policy(config.policy_id, new);
            return Err(e.into());
        }
        let entry = match self.plane_entry(sandbox, Arc::new(new.clone()), config.policy_id) {
            Ok(entry) => entry,
            Err(e) => {
                self.host.datapath.remove_policy(config.policy_id, new);
                return Err(e);
            }
        };
        let switch = SwitchRequest {
            sandbox: entry,
            ifindex,
            config: *config,
            old_policy_id,
            restore: restore.map(|r| r.iter().map(|(ip, l)| (*ip, l.clone())).collect()),
        };
        if let Err(e) = self.shared.link.switch(switch) {
            self.host.datapath.remove_policy(config.policy_id, new);
            return Err(e.into());
        }
        self.host.datapath.remove_policy(old_policy_id, old);
        Ok(())
    }

    /// Switches every sandbox to `new` (already validated as a whole):
    /// compile all first, then one generation switch per changed sandbox.
    pub(super) fn switch_to(&mut self, new: PolicySet) -> Result<serde_json::Value, DaemonError> {
        let mut plans = Vec::new();
        for (name, record) in &self.state.sandboxes {
            let entry = new.get(&record.policy).ok_or_else(|| DaemonError::PolicyInUse { policy: record.policy.clone(), sandbox: name.clone() })?;
            let hash = text_hash(&entry.source, &entry.text);
            if hash == record.policy_hash {
                continue;
            }
            let spec = self.spec(record)?;
            let compiled = self.host.compile_for(&entry.policy, &spec)?;
            plans.push(Plan { name: name.clone(), spec, compiled, hash, entry: entry.clone() });
        }
        let generation = self.state.policy_generation + 1;
        // Each switched sandbox with what it had, to put back if a later
        // one fails: a policy set is in force everywhere or nowhere.
        let mut switched: Vec<Switched> = Vec::new();
        for Plan { name, spec, compiled, hash, entry } in plans {
            let before = Switched {
                record: self.state.sandboxes[&name].clone(),
                policy: self.in_force.policies[&name].clone(),
                learned: self.shared.link.learned_table(&name).into_iter().collect(),
            };
            if let Err(e) = self.switch_sandbox(&name, &spec, Arc::new(compiled), generation, None) {
                let rolled_back = switched.len();
                let failed_rollbacks = self.roll_back(switched);
                self.state.prune_texts();
                // The records carry the policy ids now in the maps, and the
                // DNS proxy must learn under those.
                self.publish_routes();
                self.state.save(&self.config.state_dir)?;
                return Err(DaemonError::RolledBack { sandbox: name, source: Box::new(e), rolled_back, failed_rollbacks });
            }
            let r = self.state.sandboxes.get_mut(&name).expect("present");
            r.policy_hash = hash.clone();
            self.state.policy_texts.insert(hash, PolicyText { source: entry.source.clone(), text: entry.text.clone() });
            switched.push(before);
        }
        let switched: Vec<String> = switched.into_iter().map(|s| s.record.name).collect();
        self.state.policy_generation = generation;
        self.policies.replace(new);
        self.state.prune_texts();
        self.state.save(&self.config.state_dir)?;
        self.publish_routes();
        Ok(json!({ "policy_generation": generation, "sandboxes_switched": switched, "policies": self.policies.set.keys().collect::<Vec<_>>() }))
    }

    /// One sandbox to `compiled` under a fresh policy id (map writes first,
    /// then the record and the in-force policy).
    fn switch_sandbox(
        &mut self,
        name: &str,
        spec: &SandboxSpec,
        compiled: Arc<CompiledPolicy>,
        generation: u64,
        restore: Option<&HashMap<IpAddr, LearnedAddr>>,
    ) -> Result<(), DaemonError> {
        let record = self.state.sandboxes[name].clone();
        let ifindex = self.host.netlink.link_index(&record.tap)?;
        let policy_id = self.state.take_policy_id();
        let cfg = self.host.datapath_config(spec, &compiled, policy_id);
        let old = self.in_force.policies[name].clone();
        self.switch_generation(name, ifindex, &cfg, &compiled, (record.policy_id, &old), restore)?;
        let r = self.state.sandboxes.get_mut(name).expect("present");
        r.policy_id = policy_id;
        r.policy_generation = generation;
        self.in_force.policies.insert(name.to_string(), compiled);
        Ok(())
    }

    /// Puts sandboxes back on the policy they had (newest first), each under
    /// a fresh id as any switch is; returns the ones that could not be.
    fn roll_back(&mut self, switched: Vec<Switched>) -> Vec<String> {
        let mut failed = Vec::new();
        for Switched { record: before, policy: old, learned } in switched.into_iter().rev() {
            let name = before.name.clone();
            let result = self.spec(&before).and_then(|spec| self.switch_sandbox(&name, &spec, old, before.policy_generation, Some(&learned)));
            match result {
                Ok(()) => {
                    let r = self.state.sandboxes.get_mut(&name).expect("present");
                    r.policy_hash = before.policy_hash;
                    tracing::warn!(sandbox = %name, "rolled back to its policy generation {}", before.policy_generation);
                }
                Err(e) => {
                    tracing::error!(sandbox = %name, "rolling back failed, it stays on the new generation: {e}");
                    failed.push(name);
                }
            }
        }
        failed
    }

    pub(super) fn apply(&mut self, source: &str, text: &str) -> Result<serde_json::Value, DaemonError> {
        let entry = PolicyEntry::parse(source, text)?;
        let applied_dir = self.config.applied_policy_dir();
        let stored = applied_dir.join(format!("{}.toml", entry.policy.name));
        // Kept under its stored path, so a restart reads the same text.
        let entry = PolicyEntry { source: stored.display().to_string(), ..entry };
        let mut new = self.policies.set.clone();
        new.insert(entry.policy.name.clone(), entry.clone());
        // Validate everything before anything changes.
        for record in self.state.sandboxes.values().filter(|r| r.policy == entry.policy.name) {
            self.host.compile_for(&entry.policy, &self.spec(record)?)?;
        }
        let previous = std::fs::read(&stored).ok();
        crate::util::fs::write_atomic(&stored, text.as_bytes()).map_err(io_err(&stored))?;
        let result = self.switch_to(new);
        if result.is_err() {
            // Not in force, so not kept: a restart must not pick it up.
            let restored = match previous {
                Some(bytes) => crate::util::fs::write_atomic(&stored, &bytes),
                None => std::fs::remove_file(&stored),
            };
            if let Err(e) = restored {
                tracing::error!(path = %stored.display(), "restoring the applied policy file: {e}");
            }
        }
        result
    }

    pub(super) fn reload(&mut self) -> Result<serde_json::Value, DaemonError> {
        let loaded = self.local_and_fleet().inspect_err(|e| {
            self.policies.reload_failures += 1;
            self.policies.last_reload_error = Some(e.to_string());
        });
        let result = loaded.and_then(|(local, all)| {
            let switched = self.switch_to(all)?;
            self.keep_local(local);
            Ok(switched)
        });
        match &result {
            Ok(_) => self.policies.last_reload_error = None,
            Err(e) => {
                self.policies.last_reload_error = Some(e.to_string());
                tracing::error!("policy reload rejected, the policies in force stay: {e}");
            }
        }
        result
    }
}
