//! The learned store: which addresses DNS answers opened for each
//! sandbox, under which names, until when. It mirrors the learned entries of
//! the pinned tries ([`crate::datapath::learned`]), is kept in a snapshot
//! across restarts, and is swept of expired entries once a second.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sbx_net_common::PolicyValue;

use crate::datapath::learned::LearnedMaps;
use crate::dns::decide::LearnedAddr;
use crate::policy::compile::CompiledPolicy;
use crate::sandbox::route::Routes;
use crate::util::clock::boot_time_ns;

/// Learned addresses per sandbox (what the tries hold beyond the compiled
/// policy), for expiry and for carrying them across policy generations.
#[derive(Default)]
pub struct Learned {
    pub by_sandbox: HashMap<String, HashMap<IpAddr, LearnedAddr>>,
    /// Bumped on every change, so the snapshot is rewritten only then.
    pub version: u64,
}

/// One line of the snapshot: what a restarted daemon needs besides the
/// trie entry itself (which survives in the pinned map).
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotEntry {
    sandbox: String,
    ip: IpAddr,
    policy_id: u32,
    names: BTreeSet<String>,
}

impl Learned {
    /// Writes the name↔address knowledge to `path` (atomically).
    pub fn write_snapshot(&self, path: &Path) -> std::io::Result<()> {
        let entries: Vec<SnapshotEntry> = self
            .by_sandbox
            .iter()
            .flat_map(|(sandbox, t)| {
                t.iter().map(|(ip, l)| SnapshotEntry { sandbox: sandbox.clone(), ip: *ip, policy_id: l.policy_id, names: l.names.clone() })
            })
            .collect();
        crate::util::fs::write_atomic(path, &serde_json::to_vec(&entries).map_err(std::io::Error::other)?)
    }

    /// Restores the table from the snapshot and the tries: an entry is back
    /// only if the trie still holds a live learned value for it.
    pub fn restore(path: &Path, maps: &LearnedMaps) -> Learned {
        let mut learned = Learned::default();
        let Ok(bytes) = std::fs::read(path) else { return learned };
        let Ok(entries) = serde_json::from_slice::<Vec<SnapshotEntry>>(&bytes) else {
            tracing::warn!(path = %path.display(), "unreadable learned-address snapshot; starting empty");
            return learned;
        };
        let now = boot_time_ns();
        for e in entries {
            let Some(value) = maps.get(e.policy_id, e.ip) else { continue };
            if value.learned_until_ns > now {
                learned.by_sandbox.entry(e.sandbox).or_default().insert(e.ip, LearnedAddr { policy_id: e.policy_id, value, names: e.names, answered_ns: now });
            }
        }
        learned
    }
}

/// The tries' handles and the learned table, under one async-aware lock
/// (the daemon's control thread takes it with `blocking_lock`).
pub type SharedLearned = Arc<tokio::sync::Mutex<(LearnedMaps, Learned)>>;

impl crate::observe::ingest::DestinationNames for SharedLearned {
    async fn names(&self, queries: &[(Option<&str>, Option<IpAddr>)]) -> Vec<Vec<String>> {
        let guard = self.lock().await;
        queries
            .iter()
            .map(|(sandbox, ip)| match (sandbox, ip) {
                (Some(sandbox), Some(ip)) => guard.1.by_sandbox.get(*sandbox).and_then(|t| t.get(ip)).map(|l| l.names.iter().cloned().collect()).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect()
    }
}

/// Removes expired learned addresses from the tries (the classifier already
/// ignores them; this frees the entries), once a second.
pub async fn collect_expired(
    state: SharedLearned,
    snapshot: std::path::PathBuf,
    policies: impl Fn(&str) -> Option<Arc<CompiledPolicy>> + Send + 'static,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut written = u64::MAX;
    loop {
        tick.tick().await;
        let now = boot_time_ns();
        let mut guard = state.lock().await;
        let (maps, learned) = &mut *guard;
        let mut changed = false;
        for (sandbox, table) in learned.by_sandbox.iter_mut() {
            let policy = policies(sandbox);
            table.retain(|ip, l| {
                if l.value.learned_until_ns > now {
                    return true;
                }
                // Put back what the policy itself says at this exact
                // address, if it has an entry there; else drop the key.
                let exact = policy.as_ref().and_then(|p| static_exact(p, *ip));
                match exact {
                    Some(v) => maps.insert_or_count_failure(l.policy_id, *ip, &v),
                    None => maps.remove(l.policy_id, *ip),
                }
                changed = true;
                false
            });
        }
        learned.by_sandbox.retain(|_, t| !t.is_empty());
        if changed {
            learned.version += 1;
        }
        if learned.version != written {
            match learned.write_snapshot(&snapshot) {
                Ok(()) => written = learned.version,
                Err(e) => tracing::warn!(path = %snapshot.display(), "writing the learned-address snapshot: {e}"),
            }
        }
    }
}

/// The sandbox's guest addresses (both families) from the routing table.
pub(super) fn guest_addresses(routes: &Routes, sandbox: &str) -> Vec<IpAddr> {
    routes.read().unwrap_or_else(|p| p.into_inner()).iter().filter(|(_, r)| r.sandbox == sandbox).map(|(ip, _)| *ip).collect()
}

pub(super) fn static_exact(policy: &CompiledPolicy, ip: IpAddr) -> Option<PolicyValue> {
    match ip {
        IpAddr::V4(a) => policy.v4.iter().find(|(n, len, _)| *len == 32 && *n == a).map(|(_, _, v)| *v),
        IpAddr::V6(a) => policy.v6.iter().find(|(n, len, _)| *len == 128 && *n == a).map(|(_, _, v)| *v),
    }
}

